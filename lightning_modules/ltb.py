"""The Learning to Branch search (``dymu.baselines.ltb``) and ``TreeSearchStage``, what the static tree searches
(LTB, BMTAS) share: the supergraph built from a DYMU anchor checkpoint or from scratch, the found tree in the
checkpoint, its cost and its architecture distribution in the logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.backbones.base import Backbone, build_backbone
from dymu.baselines.ltb import ARCHITECTURE_KEY, LearnToBranchNet, TreeSearchNet, ltb_temperature
from dymu.checkpoint import META_KEY, submodule_state
from dymu.preference import TRAINING_ETA, Preference
from dymu.regularizer import usage_probabilities
from dymu.search_space import Architecture
from dymu.tasks import preference_loss, task_losses, tasks_from_config
from lightning_modules.base import default_optimizer
from lightning_modules.shared_mtl import BaselineStage

INITS = ("anchor", "scratch")


class TreeSearchStage(BaselineStage):
    """A ``BaselineStage`` over a ``TreeSearchNet``: validation runs the current found tree; the checkpoint's
    metadata holds the found tree (``dymu.baselines.ltb.found_architecture`` reads it).

    The training objective is the uniform preference's ``(1/N) sum_t w_t L_t`` of the baselines (the papers'
    weighted task sum, ``sum_k alpha_k L_k``, with ``alpha_k = w_k / N``).
    """

    def __init__(self, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None, seed: int,
                 loss_scales: str, anchor_checkpoint: str | None) -> None:
        super().__init__(optimizer, lr_scheduler, TRAINING_ETA, seed, 0, 1, loss_scales, anchor_checkpoint)
        self.model: TreeSearchNet  # type: ignore[assignment]

    def build_supergraph(self, model_class: type[TreeSearchNet], backbone: Backbone | None,
                         task_configs: Sequence[dict[str, Any]] | None, input_shape: Sequence[int] | None,
                         init: str, **sizes: Any) -> None:
        """``self.model``: the supergraph, its streams and heads copied from ``self.anchor_checkpoint`` when
        ``init="anchor"`` (its backbone, tasks and input shape are the defaults), fresh when ``"scratch"``."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "anchor" and self.anchor_checkpoint is None:
            raise ValueError(f"init='anchor' needs anchor_checkpoint (a DYMU run's anchor final.ckpt); use "
                             f"init='scratch' to search from fresh weights ({self.stage_name})")
        state = None
        if self.anchor_checkpoint is not None:
            ckpt = self.load_parent(self.anchor_checkpoint, task_configs, backbone)
            config = ckpt[META_KEY]["model"]
            if config.get("baseline") is not None or "edge" not in config:
                raise ValueError(f"{self.anchor_checkpoint} holds no anchor net (stage "
                                 f"{ckpt[META_KEY].get('stage')!r}); give the anchor stage's checkpoint")
            backbone = backbone if backbone is not None else build_backbone(config["backbone"])
            task_configs = task_configs if task_configs is not None else config["tasks"]
            input_shape = input_shape if input_shape is not None else config.get("input_shape")
            state = submodule_state(ckpt["state_dict"], "model.anchor")
        if backbone is None or task_configs is None:
            raise ValueError(f"{self.stage_name} from scratch needs the backbone and the tasks (link them from the "
                             "data module; the CLI does)")
        self.set_tasks(task_configs)
        self.model = model_class(backbone, tasks_from_config(list(task_configs)), input_shape, **sizes)
        if init == "anchor" and state is not None:
            self.model.load_anchor(state)

    def task_objective(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The uniform preference's loss and the unscaled task losses."""
        losses = task_losses(self.tasks, outputs, batch)
        uniform = Preference.uniform(len(self.tasks)).r_tensor(device=losses.device)
        return preference_loss(losses, uniform, self.scales), losses

    def validation_preferences(self) -> list[Preference]:
        return [Preference.uniform(len(self.tasks))]

    def logging_step(self) -> bool:
        """Whether the logger writes this step's metrics (Lightning writes every ``log_every_n_steps`` steps, after
        the step whose number plus one is a multiple), so the architecture distribution is computed only then."""
        every = getattr(self.trainer, "log_every_n_steps", 50) or 1
        return (self.global_step + 1) % every == 0

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.model.input_shape is None:
            return
        costs = self.model.node_costs()
        anchor = costs.cost(Architecture.anchor(self.model.n_tasks, self.model.anchor.n_layers))
        tree = self.model.architecture()
        self.log("val/params_fraction", costs.cost(tree)["params"] / anchor["params"])
        self.log("val/used_nodes", float(tree.num_used_nodes()))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[META_KEY][ARCHITECTURE_KEY] = self.model.architecture().to_list()


class LearnToBranchSearch(TreeSearchStage):
    """Learning to Branch: network weights and branching distributions trained jointly on the task loss, a
    Gumbel-sampled tree per step, the final tree by argmax (``dymu.baselines.ltb``).

    One optimizer with two parameter groups: the weights (``optimizer``'s settings) and the branching logits
    (``branching_lr``, no weight decay). During the first ``warmup_steps`` steps the logits get no update at all
    (their gradient is dropped before the optimizer step, so even Adam's moments stay empty).

    Args:
        backbone: one stream's blocks and heads; default: the anchor checkpoint's.
        task_configs: task configs (linked from the data module); must match the anchor's.
        input_shape: one input's shape (linked from the data module), for the cost; default: the anchor's.
        anchor_checkpoint: a DYMU anchor stage checkpoint: the streams' initial weights (``init="anchor"``) and,
            with ``loss_scales="anchor"``, the loss scales.
        init: ``"anchor"`` (the single-task streams) or ``"scratch"`` (the backbone's initialisation).
        warmup_steps: W, steps without branching updates.
        temperature, temperature_power, temperature_every: ``dymu.baselines.ltb.ltb_temperature``.
        branching_lr: learning rate of the branching logits.
        loss_scales: ``"config"`` (the tasks' ``w_t``) or ``"anchor"`` (``1 / L_t(anchor)``).
        optimizer: the weights' optimizer factory (it receives the two parameter groups).
        lr_scheduler: optional scheduler factory (stepped every training step).
        seed: kept for the stage runner's seeding (the Gumbel noise follows the global seed).
    """

    stage_name = "ltb"

    def __init__(self, backbone: Backbone | None = None, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, anchor_checkpoint: str | None = None,
                 init: str = "anchor", warmup_steps: int = 0, temperature: float = 10.0,
                 temperature_power: float = 0.5, temperature_every: int = 1, branching_lr: float = 1e-2,
                 loss_scales: str = "config", optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0) -> None:
        super().__init__(optimizer, lr_scheduler, seed, loss_scales, anchor_checkpoint)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        if warmup_steps < 0 or branching_lr < 0:
            raise ValueError(f"need warmup_steps >= 0 and branching_lr >= 0, got {warmup_steps}, {branching_lr}")
        ltb_temperature(0, 0, temperature, temperature_power, temperature_every)  # a clear error for bad values now
        self.warmup_steps, self.branching_lr = warmup_steps, branching_lr
        self.temperature0, self.temperature_power, self.temperature_every = (temperature, temperature_power,
                                                                             temperature_every)
        self.build_supergraph(LearnToBranchNet, backbone, task_configs, input_shape, init)
        self.model: LearnToBranchNet  # type: ignore[assignment]

    def configure_optimizers(self) -> Any:
        groups = [{"params": self.model.weight_parameters()},
                  {"params": [self.model.logits], "lr": self.branching_lr, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def in_warmup(self) -> bool:
        return self.global_step < self.warmup_steps

    def temperature(self) -> float:
        return ltb_temperature(self.global_step, self.warmup_steps, self.temperature0, self.temperature_power,
                               self.temperature_every)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        temperature = self.temperature()
        loss, losses = self.task_objective(self.model.search_forward(batch["image"], temperature), batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_task_losses("train", losses)
        self.log("train/temperature", temperature)
        if self.logging_step():
            self.log_distribution()
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.in_warmup():
            self.model.logits.grad = None  # the optimizer skips a parameter without a gradient

    @torch.no_grad()
    def log_distribution(self) -> None:
        """Every child's parent probabilities ``arch/layer{k}/child{j}/parent{i}`` and the expected share of used
        block nodes."""
        probs = self.model.branching_probabilities()
        values = {f"arch/layer{k}/child{j}/parent{i}": probs[k, j, i]
                  for k in range(probs.shape[0]) for j in range(probs.shape[1]) for i in range(probs.shape[2])}
        values["arch/expected_used_fraction"] = usage_probabilities(probs)[:-1].mean()
        self.log_dict(values)
