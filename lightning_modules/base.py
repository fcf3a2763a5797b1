"""What every stage module shares, in one flat base class with explicit hooks (``StageModule``), two small mixins
for the stages that share more (``FrozenAnchorMixin``: edge and weight; ``FoundTreeMixin``: ltb, bmtas and
retrain), and plain functions (the anchor's loss scales, the preference sampler, the validation preferences).

Every stage is ``StageModule`` or ``<Mixin>, StageModule``: at most two levels below ``LightningModule``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from dymu.backbones.base import Backbone, build_backbone
from dymu.baselines.ltb import ARCHITECTURE_KEY, TreeSearchNet
from dymu.checkpoint import META_KEY, file_sha256, load_checkpoint, submodule_state
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference, evaluation_preferences, sample_training_preference
from dymu.search_space import Architecture
from dymu.tasks import Task, preference_loss, task_losses, task_scales, tasks_from_config
from dymu.training import weight_adaptation_loss

LOSS_SCALES = ("config", "anchor")
INITS = ("anchor", "scratch")


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


@torch.no_grad()
def anchor_loss_scales(anchor: nn.Module, loader: Iterable[dict[str, Tensor]], tasks: Sequence[Task],
                       device: torch.device, strategy: Any) -> Tensor:
    """``w_t = 1 / L_t(anchor)`` over ``loader`` (the validation set), the loss sums added over the DDP processes
    by ``strategy.reduce``; on ``device``.

    Raises:
        ValueError: a loss is not positive (its scale would not be finite).
    """
    from dymu.evaluation import losses_from_sums, task_loss_sums

    total, support = task_loss_sums(lambda x: anchor(x), loader, tasks, device, allow_empty=True)
    total = strategy.reduce(total.to(device), reduce_op="sum")
    support = strategy.reduce(support.to(device), reduce_op="sum")
    losses = losses_from_sums(total.cpu(), support.cpu(), tasks)
    if not bool((losses > 0).all()):
        raise ValueError(f"loss_scales='anchor': the anchor's validation losses {losses.tolist()} must be > 0")
    return (1.0 / losses).to(device)


@dataclass(frozen=True)
class PreferenceSampler:
    """The ``groups`` training preferences of a step, ``r ~ Dirichlet(eta)`` and ``c ~ U(0, 1)``
    (``dymu.preference.sample_training_preference``), drawn in group order from a generator seeded by
    ``(seed, step)``: the same on every DDP process and the same again after resuming."""

    eta: float
    groups: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.eta <= 0:
            raise ValueError(f"dirichlet_eta must be > 0, got {self.eta}")
        if self.groups < 1:
            raise ValueError(f"preference_groups must be >= 1, got {self.groups}")

    def draw(self, n_tasks: int, step: int) -> list[Preference]:
        rng = np.random.default_rng([self.seed, step])
        return [sample_training_preference(n_tasks, rng, eta=self.eta) for _ in range(self.groups)]


def controllable_validation_preferences(n_tasks: int, count: int, seed: int) -> list[Preference]:
    """A controllable model's validation preferences: the uniform ``r`` at ``c = 0`` and ``c = 1``, then ``count``
    fixed ``r ~ Dirichlet(1)`` at ``c = 0`` and the same at ``c = 1``."""
    return [Preference.uniform(n_tasks, 0.0), Preference.uniform(n_tasks, 1.0),
            *evaluation_preferences(n_tasks, count, c=0.0, seed=seed),
            *evaluation_preferences(n_tasks, count, c=1.0, seed=seed)]


def baseline_validation_preferences(n_tasks: int, count: int, seed: int) -> list[Preference]:
    """A preference-conditioned baseline's (no cost input): the uniform ``r``, then ``count`` fixed
    ``r ~ Dirichlet(1)``."""
    return [Preference.uniform(n_tasks), *evaluation_preferences(n_tasks, count, c=0.0, seed=seed)]


class StageModule(L.LightningModule):
    """The base of every stage: holds ``self.model`` and the tasks that define the losses.

    A stage's ``__init__`` calls ``super().__init__`` with the common settings (keyword-only), saves its
    hyperparameters, checks and stores its own settings, then calls ``configure_stage``, which reads the parent
    checkpoint (if any) and runs the construction hooks in order:

    - ``configure_losses(task_configs)``: ``self.task_configs``, ``self.tasks`` and their ``scales`` ``w_t``;
    - ``configure_metrics()``: ``self.val_metrics``, one metric per task;
    - ``configure_models(parent)`` (every stage implements it): ``self.model``, given the parent checkpoint.

    The training hooks a stage overrides where it differs from the default:

    - ``training_preferences()`` (default: the uniform preference) and ``training_step`` (default: the
      preference objective ``mean_g sum_t r_{g,t} w_t L_t`` over them, ``dymu.training.weight_adaptation_loss``);
    - ``validation_preferences()`` (default: the uniform preference) and ``preference_forward(x, pref)``
      (default: ``self.model(x, pref)``), which ``validation_step`` runs (the first preference's outputs feed the
      task metrics);
    - ``optimizer_parameters()``: what the optimizer factory receives (default: the trainable parameters);
    - ``checkpoint_metadata()``: the checkpoint's ``META_KEY`` entry;
    - ``scale_anchor()``: the anchor whose validation losses set the scales with ``loss_scales="anchor"``.

    ``loss_scales="anchor"`` replaces the tasks' scales ``w_t`` in this stage's objective (and its logged
    ``train/loss`` and ``val/loss``) by ``1 / L_t(anchor)`` on the validation set, so the anchor's scaled losses
    are all 1 and the regularizer weights mean the same on every data set (docs/method.md, "Edge hypernet and
    Gumbel-softmax search": the lambdas act relative to the scaled task losses). The values are stored in the
    checkpoint's metadata (``loss_scales``). ``dymu evaluate`` keeps the configured scales (the paper's protocol).
    Stages on a frozen anchor (``calibrates_on_own_anchor``) use their own; the others the anchor of
    ``scales_checkpoint`` (a DYMU run's anchor stage), recorded in the metadata (``loss_scales_from``), so that a
    baseline and DYMU trained on the same data weight the tasks alike.

    Args (keyword-only):
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory (stepped every training step).
        loss_scales: ``"config"`` (the tasks' ``w_t``) or ``"anchor"`` (``1 / L_t(anchor)``).
        scales_checkpoint: the anchor checkpoint for ``loss_scales="anchor"`` (stages without an anchor of their
            own).
    """

    stage_name = ""
    #: the model holds a frozen anchor (``self.model.anchor``) that sets the scales with ``loss_scales="anchor"``
    calibrates_on_own_anchor = False

    def __init__(self, *, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None = None,
                 loss_scales: str = "config", scales_checkpoint: str | None = None) -> None:
        super().__init__()
        if loss_scales not in LOSS_SCALES:
            raise ValueError(f"loss_scales must be one of {LOSS_SCALES}, got {loss_scales!r}")
        if loss_scales == "anchor" and scales_checkpoint is None and not self.calibrates_on_own_anchor:
            raise ValueError("loss_scales='anchor' needs anchor_checkpoint: the anchor stage's checkpoint whose "
                             "validation losses set the scales (e.g. the DYMU run's anchor final.ckpt)")
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.loss_scales, self.scales_checkpoint = loss_scales, scales_checkpoint
        self.parent: dict[str, str] | None = None
        self.model: nn.Module

    # ------------------------------------------------------------------------------------------- construction

    def configure_stage(self, task_configs: Sequence[dict[str, Any]] | None, parent: str | None = None,
                        backbone: Backbone | None = None) -> None:
        """Read the parent checkpoint ``parent`` (``load_parent``: checked against ``task_configs`` and
        ``backbone``), then run ``configure_losses`` (with ``task_configs``, else the parent's tasks),
        ``configure_metrics`` and ``configure_models``."""
        ckpt = self.load_parent(parent, task_configs, backbone) if parent is not None else None
        if task_configs is None and ckpt is not None:
            task_configs = ckpt[META_KEY]["model"]["tasks"]
        if task_configs is None:
            raise ValueError(f"{type(self).__name__} needs the tasks: link them from the data module (the CLI does)")
        self.configure_losses(task_configs)
        self.configure_metrics()
        self.configure_models(ckpt)

    def configure_losses(self, task_configs: Sequence[dict[str, Any]]) -> None:
        """The tasks whose losses the stage trains (``self.task_configs``, ``self.tasks``) and their scales."""
        self.task_configs = list(task_configs)
        self.tasks: list[Task] = tasks_from_config(self.task_configs)
        self.register_buffer("scales", task_scales(self.tasks), persistent=False)

    def configure_metrics(self) -> None:
        """Every task's validation metric."""
        self.val_metrics = nn.ModuleDict({t.name: t.make_metric() for t in self.tasks})

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        """Build ``self.model`` from the stage's settings and ``parent``, the parent checkpoint (or None)."""
        raise NotImplementedError

    def load_parent(self, path: str, tasks: Sequence[dict[str, Any]] | None, backbone: Backbone | None,
                    ) -> dict[str, Any]:
        """Read the previous stage's checkpoint (weights only), check it fits, remember its path and hash."""
        ckpt = load_checkpoint(path)
        check_compatible(ckpt[META_KEY]["model"], path, tasks, backbone)
        self.parent = {"path": str(Path(path).resolve()), "sha256": file_sha256(path),
                       "stage": ckpt[META_KEY].get("stage", "")}
        return ckpt

    # --------------------------------------------------------------------------------------- losses, metrics

    def losses(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        return task_losses(self.tasks, outputs, batch)

    def log_task_losses(self, prefix: str, losses: Tensor, **kwargs: Any) -> None:
        for task, value in zip(self.tasks, losses):
            self.log(f"{prefix}/loss_{task.name}", value, **kwargs)

    def update_val_metrics(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        for task in self.tasks:
            task.update_metric(self.val_metrics[task.name], outputs[task.name], batch[task.name])

    # ------------------------------------------------------------------------------------ training, validation

    def training_preferences(self) -> list[Preference]:
        """The preferences of the current training step (default: the uniform one)."""
        return [Preference.uniform(len(self.tasks))]

    def validation_preferences(self) -> list[Preference]:
        """The preferences every validation batch runs (default: the uniform one); the first one's outputs feed
        the task metrics."""
        return [Preference.uniform(len(self.tasks))]

    def preference_forward(self, x: Tensor, pref: Preference) -> dict[str, Tensor]:
        """The stage's model for one preference at validation (no sampling)."""
        return self.model(x, pref)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = weight_adaptation_loss(self.model, self.tasks, self.scales, batch,  # type: ignore[arg-type]
                                     self.training_preferences())
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_task_losses("train", out["losses"])
        return out["loss"]

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
        for task in self.tasks:
            self.log(f"val/{task.name}_{task.metric_name}", self.val_metrics[task.name].compute(), sync_dist=True)
            self.val_metrics[task.name].reset()

    # ------------------------------------------------------------------------------------------- loss scales

    def on_fit_start(self) -> None:
        if self.loss_scales == "anchor":
            self.calibrate_scales()

    def scale_anchor(self) -> nn.Module:
        """The anchor whose validation losses set the scales: the model's own frozen anchor
        (``calibrates_on_own_anchor``), else the anchor of ``scales_checkpoint`` (loaded here, on this device)."""
        if self.calibrates_on_own_anchor:
            return self.model.anchor  # type: ignore[return-value]
        return DynamicMultiTaskModel.from_checkpoint(str(self.scales_checkpoint)).to(self.device).anchor

    def calibrate_scales(self) -> None:
        """``w_t = 1 / L_t(anchor)`` over the validation set (summed over DDP processes): ``anchor_loss_scales``
        of ``scale_anchor()``."""
        anchor = self.scale_anchor()
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("loss_scales='anchor' needs a data module with a validation set")
        self.scales = anchor_loss_scales(anchor, datamodule.val_dataloader(), self.tasks, self.device,
                                         self.trainer.strategy)
        if self.trainer.is_global_zero:
            print(f"[dymu] {self.stage_name}: loss scales 1 / L_t(anchor) on the validation set: "
                  f"{dict(zip([t.name for t in self.tasks], [round(v, 4) for v in self.scales.tolist()]))}")

    # ------------------------------------------------------------------------------------ optimizer, checkpoint

    def optimizer_parameters(self) -> Any:
        """What the optimizer factory receives (default: the trainable parameters)."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.optimizer_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpoint_metadata(self) -> dict[str, Any]:
        """The checkpoint's ``META_KEY`` entry: the stage, the model's config, the parent, the tasks, the loss
        scales (and the checkpoint they came from)."""
        meta = {"stage": self.stage_name, "model": self.model.config(), "parent": self.parent,
                "tasks": [t.to_config() for t in self.tasks],
                "loss_scales": [float(v) for v in self.scales.tolist()]}
        if self.loss_scales == "anchor" and self.scales_checkpoint is not None:
            meta["loss_scales_from"] = self.scales_checkpoint
        return meta

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.checkpoint_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(META_KEY, {}).get("model")
        if saved is not None:
            check_compatible(saved, "being resumed", [t.to_config() for t in self.tasks], None)


class FrozenAnchorMixin:
    """For the hypernet stages (edge, weight): ``self.model`` is a ``DynamicMultiTaskModel`` built on the parent
    checkpoint with one new hypernet; the parent's parts are frozen and the anchor stays in eval mode (BatchNorm
    on its running statistics). Each training batch is split into the sampler's groups with a preference each
    (``self.sampler``, a ``PreferenceSampler``), validation runs ``controllable_validation_preferences``
    (``self.num_val_preferences``, ``self.seed``) and logs the trees' parameter fractions
    (``log_tree_costs``). The anchor sets the loss scales with ``loss_scales="anchor"``.

    Use as ``class Stage(FrozenAnchorMixin, StageModule)``."""

    calibrates_on_own_anchor = True
    model: DynamicMultiTaskModel
    sampler: PreferenceSampler
    num_val_preferences: int
    seed: int
    seeded_sampling: bool = False

    def on_train_epoch_start(self) -> None:
        """With ``seeded_sampling``: this epoch's batch order from a generator seeded by ``(seed, epoch)``
        (``dymu.batched_trials.seed_batch_order``), set before the epoch's first batch is drawn."""
        super().on_train_epoch_start()  # type: ignore[misc]
        if self.seeded_sampling:
            from dymu.batched_trials import seed_batch_order

            trainer = self.trainer  # type: ignore[attr-defined]
            seed_batch_order(trainer.train_dataloader, self.seed, trainer.current_epoch)

    def build_on_parent(self, parent: dict[str, Any], new_part: str, new_args: dict[str, Any]
                        ) -> DynamicMultiTaskModel:
        """The parent checkpoint's model plus a fresh hypernet ``new_part`` (``"edge"`` or ``"weight"``) built
        with ``new_args``: the parent's weights loaded and frozen, the anchor in eval mode."""
        config = parent[META_KEY]["model"]
        model = DynamicMultiTaskModel.from_config({**config, new_part: new_args})
        missing, unexpected = model.load_state_dict(submodule_state(parent["state_dict"], "model"), strict=False)
        if unexpected or any(not k.startswith(f"{new_part}_hypernet.") for k in missing):
            path = self.parent["path"]  # type: ignore[attr-defined]
            raise ValueError(f"{path} does not match its own config: missing {missing}, unexpected {unexpected}")
        model.requires_grad_(False)
        getattr(model, f"{new_part}_hypernet").requires_grad_(True)
        model.anchor.eval()
        return model

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]
        self.model.anchor.eval()
        return self

    def training_preferences(self) -> list[Preference]:
        """The ``preference_groups`` preferences of the current step (the first one is G = 1's)."""
        return self.sampler.draw(self.model.n_tasks, self.global_step)  # type: ignore[attr-defined]

    def validation_preferences(self) -> list[Preference]:
        return controllable_validation_preferences(self.model.n_tasks, self.num_val_preferences, self.seed)

    def log_tree_costs(self) -> None:
        """The mean parameter fraction (of the anchor's) of the validation preferences' trees at ``c = 0`` and at
        ``c = 1``."""
        if self.model.input_shape is None:
            return
        costs = [self.model.node_costs().cost(self.model.architecture(p))["params"]
                 for p in self.validation_preferences()]
        anchor = self.model.node_costs().cost(Architecture.anchor(self.model.n_tasks, self.model.anchor.n_layers))
        half = 2 + self.num_val_preferences
        log = self.log  # type: ignore[attr-defined]
        log("val/params_fraction_c0", float(np.mean(costs[2:half] + costs[:1])) / anchor["params"])
        log("val/params_fraction_c1", float(np.mean(costs[half:] + costs[1:2])) / anchor["params"])


def check_tree_init(stage: str, init: str, anchor_checkpoint: str | None, backbone: Backbone | None,
                    task_configs: Sequence[dict[str, Any]] | None) -> None:
    """The checks of ``FoundTreeMixin.build_supergraph``'s arguments, before anything is read or built."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "anchor" and anchor_checkpoint is None:
        raise ValueError(f"init='anchor' needs anchor_checkpoint (a DYMU run's anchor final.ckpt); use "
                         f"init='scratch' to search from fresh weights ({stage})")
    if anchor_checkpoint is None and (backbone is None or task_configs is None):
        raise ValueError(f"{stage} from scratch needs the backbone and the tasks (link them from the data module; "
                         "the CLI does)")


class FoundTreeMixin:
    """For the stages over a tree of the anchor's nodes (ltb, bmtas: a ``TreeSearchNet`` supergraph; retrain: the
    fixed tree): the model built from a DYMU anchor checkpoint or from scratch (``build_supergraph``), the found
    tree in the checkpoint's metadata (``dymu.baselines.ltb.found_architecture`` reads it), its cost in the logs
    (``log_found_tree``). Validation runs the uniform preference (``StageModule``'s default).

    The searches' objective is the uniform preference's ``(1/N) sum_t w_t L_t`` of the baselines
    (``task_objective``; the papers' weighted task sum, ``sum_k alpha_k L_k``, with ``alpha_k = w_k / N``).

    Use as ``class Stage(FoundTreeMixin, StageModule)``; check the arguments first with ``check_tree_init``."""

    model: TreeSearchNet
    tasks: list[Task]
    scales: Tensor
    stage_name: str

    def build_supergraph(self, model_class: type[TreeSearchNet], parent: dict[str, Any] | None,
                         backbone: Backbone | None, input_shape: Sequence[int] | None, init: str,
                         **sizes: Any) -> TreeSearchNet:
        """The supergraph ``model_class``, its streams and heads copied from the anchor checkpoint ``parent`` when
        ``init="anchor"`` (its backbone and input shape are the defaults), fresh when ``"scratch"``; its tasks
        are ``self.task_configs``."""
        state = None
        if parent is not None:
            config = parent[META_KEY]["model"]
            if config.get("baseline") is not None or "edge" not in config:
                path = self.parent["path"]  # type: ignore[attr-defined]
                raise ValueError(f"{path} holds no anchor net (stage {parent[META_KEY].get('stage')!r}); give the "
                                 "anchor stage's checkpoint")
            backbone = backbone if backbone is not None else build_backbone(config["backbone"])
            input_shape = input_shape if input_shape is not None else config.get("input_shape")
            state = submodule_state(parent["state_dict"], "model.anchor")
        if backbone is None:
            raise ValueError(f"{self.stage_name} from scratch needs the backbone (link it from the config)")
        model = model_class(backbone, tasks_from_config(list(self.task_configs)),  # type: ignore[attr-defined]
                            input_shape, **sizes)
        if init == "anchor" and state is not None:
            model.load_anchor(state)
        return model

    def task_objective(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The uniform preference's loss and the unscaled task losses."""
        losses = task_losses(self.tasks, outputs, batch)
        uniform = Preference.uniform(len(self.tasks)).r_tensor(device=losses.device)
        return preference_loss(losses, uniform, self.scales), losses

    def logging_step(self) -> bool:
        """Whether the logger writes this step's metrics (Lightning writes every ``log_every_n_steps`` steps, after
        the step whose number plus one is a multiple), so the architecture distribution is computed only then."""
        every = getattr(self.trainer, "log_every_n_steps", 50) or 1  # type: ignore[attr-defined]
        return (self.global_step + 1) % every == 0  # type: ignore[attr-defined]

    def log_found_tree(self) -> None:
        """The current found tree's parameter fraction (of the anchor's) and its number of used nodes."""
        if self.model.input_shape is None:
            return
        costs = self.model.node_costs()
        anchor = costs.cost(Architecture.anchor(self.model.n_tasks, self.model.anchor.n_layers))
        tree = self.model.architecture()
        self.log("val/params_fraction", costs.cost(tree)["params"] / anchor["params"])  # type: ignore[attr-defined]
        self.log("val/used_nodes", float(tree.num_used_nodes()))  # type: ignore[attr-defined]

    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()  # type: ignore[misc]
        meta[ARCHITECTURE_KEY] = self.model.architecture().to_list()
        return meta
