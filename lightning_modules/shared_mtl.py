"""The shared multi-task network trained at one fixed preference (the static baselines, one stage run per
preference; at the uniform preference, PHN-BN's parent)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dymu.backbones.base import Backbone
from dymu.baselines.static import StaticMultiTaskNet
from dymu.preference import Preference
from lightning_modules.base import StageModule, default_optimizer


class SharedMultiTaskTraining(StageModule):
    """Trains the shared network (one stream's blocks, N heads) for one fixed preference ``r``:
    ``sum_t r_t w_t L_t`` (``StageModule``'s preference objective at that one preference, which validation runs
    too). A static baseline per preference; PHN-BN's parent at the uniform preference.

    Args:
        backbone: how one stream is cut into blocks, and its heads.
        task_configs: task configs (linked from the data module's ``tasks``).
        input_shape: one input's shape (linked from the data module), for cost measurements.
        preference: the task preference ``r`` (N weights summing to 1); default: uniform.
        loss_scales: ``"config"`` (the tasks' ``w_t``) or ``"anchor"`` (``1 / L_t(anchor)``, see ``StageModule``).
        anchor_checkpoint: the anchor for ``loss_scales="anchor"``.
        optimizer, lr_scheduler: factories (the scheduler steps every training step).
        seed: unused by the training (one fixed preference); kept for the stage runner's seeding.
    """

    stage_name = "shared_mtl"

    def __init__(self, backbone: Backbone, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, preference: Sequence[float] | None = None,
                 loss_scales: str = "config", anchor_checkpoint: str | None = None,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: LRSchedulerCallable | None = None,
                 seed: int = 0) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales,
                         scales_checkpoint=anchor_checkpoint)
        if task_configs is None:
            raise ValueError("SharedMultiTaskTraining needs the tasks: link them from the data module (the CLI does)")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        self.anchor_checkpoint = anchor_checkpoint
        self.backbone, self.input_shape, self.preference = backbone, input_shape, preference
        self.configure_stage(task_configs)

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        self.model = StaticMultiTaskNet(self.backbone, self.tasks, self.input_shape, self.preference)

    def training_preferences(self) -> list[Preference]:
        return [self.model.trained_preference]

    def validation_preferences(self) -> list[Preference]:
        return [self.model.trained_preference]
