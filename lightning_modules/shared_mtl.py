"""The shared multi-task network trained at one fixed preference (the static baselines, one stage run per
preference; at the uniform preference, PHN-BN's parent), and ``BaselineStage``, what the baseline stages
share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.backbones.base import Backbone
from dymu.baselines.base import BaselineModel
from dymu.baselines.static import StaticMultiTaskNet
from dymu.checkpoint import META_KEY
from dymu.model import DynamicMultiTaskModel
from dymu.preference import TRAINING_ETA, Preference, evaluation_preferences
from dymu.training import weight_adaptation_loss
from lightning_modules.base import PreferenceStage, StageModule, default_optimizer


class BaselineStage(PreferenceStage):
    """A ``PreferenceStage`` over a ``dymu.baselines`` model: no frozen anchor, no tree.

    Training minimises ``mean_g sum_t r_{g,t} w_t L_t`` over the step's ``preference_groups`` preferences
    (``dymu.training.weight_adaptation_loss``, the objective of DYMU's weight stage, on this stage's model).
    Validation runs the uniform preference and ``val_preferences`` fixed ``r ~ Dirichlet(1)`` (the baselines
    have no cost input ``c``).

    ``loss_scales="anchor"`` sets ``w_t = 1 / L_t(anchor)`` on the validation set as the hypernet stages do, with
    the anchor of ``anchor_checkpoint`` (a DYMU run's anchor stage), so that a baseline and DYMU trained on the
    same data weight the tasks alike; the checkpoint's metadata records it (``loss_scales_from``).
    """

    def __init__(self, optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None, dirichlet_eta: float,
                 seed: int, val_preferences: int, preference_groups: int, loss_scales: str,
                 anchor_checkpoint: str | None) -> None:
        super().__init__(optimizer, lr_scheduler, dirichlet_eta, seed, val_preferences, preference_groups,
                         loss_scales)
        if loss_scales == "anchor" and anchor_checkpoint is None:
            raise ValueError("loss_scales='anchor' needs anchor_checkpoint: the anchor stage's checkpoint whose "
                             "validation losses set the scales (e.g. the DYMU run's anchor final.ckpt)")
        self.anchor_checkpoint = anchor_checkpoint
        self.model: BaselineModel  # type: ignore[assignment]

    def train(self, mode: bool = True) -> BaselineStage:
        # PreferenceStage keeps an anchor in eval mode; a baseline model keeps its own frozen parts in eval mode
        StageModule.train(self, mode)
        return self

    def calibrate_scales(self) -> None:
        """``PreferenceStage.calibrate_scales`` on the anchor of ``anchor_checkpoint``."""
        own = self.model
        self.model = DynamicMultiTaskModel.from_checkpoint(self.anchor_checkpoint).to(self.device)  # type: ignore
        try:
            super().calibrate_scales()
        finally:
            self.model = own

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = weight_adaptation_loss(self.model, self.tasks, self.scales, batch,  # type: ignore[arg-type]
                                     self.training_preferences())
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_task_losses("train", out["losses"])
        return out["loss"]

    def validation_preferences(self) -> list[Preference]:
        n = self.model.n_tasks
        return [Preference.uniform(n), *evaluation_preferences(n, self.num_val_preferences, c=0.0, seed=self.seed)]

    def preference_forward(self, x: Tensor, pref: Preference) -> dict[str, Tensor]:
        return self.model(x, pref)

    def on_validation_epoch_end(self) -> None:
        StageModule.on_validation_epoch_end(self)  # the task metrics; there is no tree whose cost to log

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.loss_scales == "anchor":
            checkpoint[META_KEY]["loss_scales_from"] = self.anchor_checkpoint


class SharedMultiTaskTraining(BaselineStage):
    """Trains the shared network (one stream's blocks, N heads) for one fixed preference ``r``:
    ``sum_t r_t w_t L_t``. A static baseline per preference; PHN-BN's parent at the uniform preference.

    Args:
        backbone: how one stream is cut into blocks, and its heads.
        task_configs: task configs (linked from the data module's ``tasks``).
        input_shape: one input's shape (linked from the data module), for cost measurements.
        preference: the task preference ``r`` (N weights summing to 1); default: uniform.
        loss_scales: ``"config"`` (the tasks' ``w_t``) or ``"anchor"`` (see ``BaselineStage``).
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
        super().__init__(optimizer, lr_scheduler, TRAINING_ETA, seed, 0, 1, loss_scales, anchor_checkpoint)
        if task_configs is None:
            raise ValueError("SharedMultiTaskTraining needs the tasks: link them from the data module (the CLI does)")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        self.set_tasks(task_configs)
        self.model = StaticMultiTaskNet(backbone, self.tasks, input_shape, preference)

    def training_preferences(self) -> list[Preference]:
        return [self.model.trained_preference]  # type: ignore[attr-defined]

    def validation_preferences(self) -> list[Preference]:
        return [self.model.trained_preference]  # type: ignore[attr-defined]
