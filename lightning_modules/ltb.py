"""The Learning to Branch search (``dymu.baselines.ltb``): network weights and branching distributions trained
jointly, the found tree in the checkpoint (``FoundTreeMixin``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.backbones.base import Backbone
from dymu.baselines.ltb import LearnToBranchNet, ltb_temperature
from dymu.regularizer import usage_probabilities
from lightning_modules.base import FoundTreeMixin, StageModule, check_tree_init, default_optimizer


class LearnToBranchSearch(FoundTreeMixin, StageModule):
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
        nodes_per_layer: K child nodes per branching block (``LearnToBranchNet``; the paper's synthetic experiment
            uses 3 for 15 tasks); default: one per task.
    """

    stage_name = "ltb"

    def __init__(self, backbone: Backbone | None = None, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, anchor_checkpoint: str | None = None,
                 init: str = "anchor", warmup_steps: int = 0, temperature: float = 10.0,
                 temperature_power: float = 0.5, temperature_every: int = 1, branching_lr: float = 1e-2,
                 loss_scales: str = "config", optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0,
                 nodes_per_layer: int | None = None) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales,
                         scales_checkpoint=anchor_checkpoint)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        if warmup_steps < 0 or branching_lr < 0:
            raise ValueError(f"need warmup_steps >= 0 and branching_lr >= 0, got {warmup_steps}, {branching_lr}")
        ltb_temperature(0, 0, temperature, temperature_power, temperature_every)  # a clear error for bad values now
        self.warmup_steps, self.branching_lr = warmup_steps, branching_lr
        self.temperature0, self.temperature_power, self.temperature_every = (temperature, temperature_power,
                                                                             temperature_every)
        check_tree_init(self.stage_name, init, anchor_checkpoint, backbone, task_configs)
        self.anchor_checkpoint, self.init = anchor_checkpoint, init
        self.backbone, self.input_shape, self.nodes_per_layer = backbone, input_shape, nodes_per_layer
        self.configure_stage(task_configs, parent=anchor_checkpoint, backbone=backbone)

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        self.model = self.build_supergraph(LearnToBranchNet, parent, self.backbone, self.input_shape, self.init,
                                           nodes_per_layer=self.nodes_per_layer)

    def optimizer_parameters(self) -> Any:
        return [{"params": self.model.weight_parameters()},
                {"params": [self.model.logits], "lr": self.branching_lr, "weight_decay": 0.0}]

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

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_found_tree()

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
