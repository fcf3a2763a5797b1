"""What the three stage modules share: checkpoint metadata, task bookkeeping, per-task validation metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from dymu.backbones.base import Backbone
from dymu.checkpoint import META_KEY, file_sha256, load_checkpoint, submodule_state
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference, evaluation_preferences, sample_training_preference
from dymu.search_space import Architecture
from dymu.tasks import Task, preference_loss, task_losses, task_scales, tasks_from_config


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def task_signature(configs: Sequence[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """What must agree between stages: name, kind and output size of every task (scales may differ)."""
    return [(c["name"], c["kind"], int(c["out_channels"])) for c in configs]


def check_compatible(model_config: dict[str, Any], path: str | Path, tasks: Sequence[dict[str, Any]] | None,
                     backbone: Backbone | None) -> None:
    """Refuse a parent checkpoint whose tasks or backbone differ from this stage's configuration."""
    if tasks is not None and task_signature(model_config["tasks"]) != task_signature(tasks):
        raise ValueError(
            f"checkpoint {path} was trained for tasks {task_signature(model_config['tasks'])} but this stage's "
            f"data has {task_signature(tasks)} (name, kind, outputs); use the checkpoint of a run on the same "
            "data, or retrain the earlier stages")
    if backbone is not None and backbone.config() != model_config["backbone"]:
        raise ValueError(f"checkpoint {path} was trained with backbone {model_config['backbone']} but this stage "
                         f"is configured with {backbone.config()}; drop model.backbone from this stage's config "
                         "(the checkpoint defines it) or point at a matching checkpoint")


class StageModule(L.LightningModule):
    """Base class: holds ``self.model`` (a ``DynamicMultiTaskModel``) and the tasks that define the losses."""

    stage_name = ""

    def __init__(self, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None) -> None:
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.parent: dict[str, str] | None = None
        self.model: DynamicMultiTaskModel

    def set_tasks(self, tasks: Sequence[dict[str, Any]]) -> None:
        self.tasks: list[Task] = tasks_from_config(list(tasks))
        self.register_buffer("scales", task_scales(self.tasks), persistent=False)
        self.val_metrics = nn.ModuleDict({t.name: t.make_metric() for t in self.tasks})

    def load_parent(self, path: str, tasks: Sequence[dict[str, Any]] | None, backbone: Backbone | None,
                    ) -> dict[str, Any]:
        """Read the previous stage's checkpoint (weights only), check it fits, remember its path and hash."""
        ckpt = load_checkpoint(path)
        check_compatible(ckpt[META_KEY]["model"], path, tasks, backbone)
        self.parent = {"path": str(Path(path).resolve()), "sha256": file_sha256(path),
                       "stage": ckpt[META_KEY].get("stage", "")}
        return ckpt

    def losses(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return task_losses(self.tasks, outputs, batch)

    def log_task_losses(self, prefix: str, losses: Tensor, **kwargs: Any) -> None:
        for task, value in zip(self.tasks, losses):
            self.log(f"{prefix}/loss_{task.name}", value, **kwargs)

    def update_val_metrics(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        for task in self.tasks:
            task.update_metric(self.val_metrics[task.name], outputs[task.name], batch[task.name])

    def on_validation_epoch_end(self) -> None:
        for task in self.tasks:
            self.log(f"val/{task.name}_{task.metric_name}", self.val_metrics[task.name].compute(), sync_dist=True)
            self.val_metrics[task.name].reset()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = {"stage": self.stage_name, "model": self.model.config(), "parent": self.parent,
                                "tasks": [t.to_config() for t in self.tasks],
                                "loss_scales": [float(v) for v in self.scales.tolist()]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(META_KEY, {}).get("model")
        if saved is not None:
            check_compatible(saved, "being resumed", [t.to_config() for t in self.tasks], None)


LOSS_SCALES = ("config", "anchor")


class PreferenceStage(StageModule):
    """Base class of the two hypernet stages: the anchor is frozen (BatchNorm on its running statistics),
    each training batch is split into ``preference_groups`` groups with a preference each, and validation
    runs a fixed set of preferences.

    The preferences of step ``s`` come from a generator seeded by ``(seed, s)`` (drawn in group order): the
    same on every DDP process and the same again after resuming.

    ``loss_scales="anchor"`` replaces the tasks' scales ``w_t`` in this stage's objective (and its logged
    ``train/loss`` and ``val/loss``) by ``1 / L_t(anchor)`` on the validation set, so the anchor's scaled losses
    are all 1 and the regularizer weights mean the same on every data set (docs/method.md, "Edge hypernet and
    Gumbel-softmax search": the lambdas act relative to the scaled task losses). The values are stored in the
    checkpoint's metadata (``loss_scales``). ``dymu evaluate`` keeps the configured scales (the paper's protocol).
    """

    def __init__(self, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None,
                 dirichlet_eta: float, seed: int, val_preferences: int, preference_groups: int = 1,
                 loss_scales: str = "config") -> None:
        super().__init__(optimizer, lr_scheduler)
        if dirichlet_eta <= 0:
            raise ValueError(f"dirichlet_eta must be > 0, got {dirichlet_eta}")
        if preference_groups < 1:
            raise ValueError(f"preference_groups must be >= 1, got {preference_groups}")
        if loss_scales not in LOSS_SCALES:
            raise ValueError(f"loss_scales must be one of {LOSS_SCALES}, got {loss_scales!r}")
        self.dirichlet_eta, self.seed, self.num_val_preferences = dirichlet_eta, seed, val_preferences
        self.preference_groups, self.loss_scales = preference_groups, loss_scales

    def build_on_parent(self, path: str, task_configs: Sequence[dict[str, Any]] | None, backbone: Backbone | None,
                        new_part: str, new_args: dict[str, Any]) -> dict[str, Any]:
        """Build ``self.model`` from the previous stage's checkpoint plus a fresh hypernet ``new_part``
        (``"edge"`` or ``"weight"``) built with ``new_args``; load the parent's weights and freeze them."""
        ckpt = self.load_parent(path, task_configs, backbone)
        config = ckpt[META_KEY]["model"]
        self.set_tasks(task_configs if task_configs is not None else config["tasks"])
        self.model = DynamicMultiTaskModel.from_config({**config, new_part: new_args})
        missing, unexpected = self.model.load_state_dict(submodule_state(ckpt["state_dict"], "model"), strict=False)
        if unexpected or any(not k.startswith(f"{new_part}_hypernet.") for k in missing):
            raise ValueError(f"{path} does not match its own config: missing {missing}, unexpected {unexpected}")
        self.model.requires_grad_(False)
        getattr(self.model, f"{new_part}_hypernet").requires_grad_(True)
        self.model.anchor.eval()
        return ckpt

    def train(self, mode: bool = True) -> PreferenceStage:
        super().train(mode)
        self.model.anchor.eval()
        return self

    def training_preferences(self) -> list[Preference]:
        """The ``preference_groups`` preferences of the current step (the first one is G = 1's)."""
        rng = np.random.default_rng([self.seed, self.global_step])
        return [sample_training_preference(self.model.n_tasks, rng, eta=self.dirichlet_eta)
                for _ in range(self.preference_groups)]

    def on_fit_start(self) -> None:
        if self.loss_scales == "anchor":
            self.calibrate_scales()

    @torch.no_grad()
    def calibrate_scales(self) -> None:
        """``w_t = 1 / L_t(anchor)`` over the validation set (summed over DDP processes)."""
        from dymu.evaluation import losses_from_sums, task_loss_sums

        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("loss_scales='anchor' needs a data module with a validation set")
        total, support = task_loss_sums(lambda x: self.model.anchor(x), datamodule.val_dataloader(), self.tasks,
                                        self.device, allow_empty=True)
        total = self.trainer.strategy.reduce(total.to(self.device), reduce_op="sum")
        support = self.trainer.strategy.reduce(support.to(self.device), reduce_op="sum")
        losses = losses_from_sums(total.cpu(), support.cpu(), self.tasks)
        if not bool((losses > 0).all()):
            raise ValueError(f"loss_scales='anchor': the anchor's validation losses {losses.tolist()} must be > 0")
        self.scales = (1.0 / losses).to(self.device)
        if self.trainer.is_global_zero:
            print(f"[dymu] {self.stage_name}: loss scales 1 / L_t(anchor) on the validation set: "
                  f"{dict(zip([t.name for t in self.tasks], [round(v, 4) for v in self.scales.tolist()]))}")

    def validation_preferences(self) -> list[Preference]:
        n = self.model.n_tasks
        return [Preference.uniform(n, 0.0), Preference.uniform(n, 1.0),
                *evaluation_preferences(n, self.num_val_preferences, c=0.0, seed=self.seed),
                *evaluation_preferences(n, self.num_val_preferences, c=1.0, seed=self.seed)]

    def preference_forward(self, x: Tensor, pref: Preference) -> dict[str, Tensor]:
        """The stage's model for one preference at validation (no sampling)."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        prefs = self.validation_preferences()
        values = []
        for i, pref in enumerate(prefs):
            outputs = self.preference_forward(batch["image"], pref)
            losses = self.losses(outputs, batch)
            values.append(preference_loss(losses, pref.r_tensor(device=self.device), self.scales))
            if i == 0:
                self.update_val_metrics(outputs, batch)
                self.log_task_losses("val", losses, sync_dist=True)
        self.log("val/loss", torch.stack(values).mean(), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.model.input_shape is None:
            return
        costs = [self.model.node_costs().cost(self.model.architecture(p))["params"]
                 for p in self.validation_preferences()]
        anchor = self.model.node_costs().cost(Architecture.anchor(self.model.n_tasks, self.model.anchor.n_layers))
        half = 2 + self.num_val_preferences
        self.log("val/params_fraction_c0", float(np.mean(costs[2:half] + costs[:1])) / anchor["params"])
        self.log("val/params_fraction_c1", float(np.mean(costs[half:] + costs[1:2])) / anchor["params"])
