"""Stage 1: train the N single-task streams of the anchor net (or assemble them from single-task runs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.backbones.base import Backbone
from dymu.checkpoint import META_KEY, load_checkpoint, submodule_state
from dymu.model import DynamicMultiTaskModel
from lightning_modules.base import StageModule, default_optimizer


class AnchorPretraining(StageModule):
    """Trains every stream on its own task: the streams share nothing, so ``sum_t w_t L_t`` trains N
    independent single-task networks in one pass.

    Args:
        backbone: how one stream is cut into blocks, and its heads.
        task_configs: task configs (linked from the data module's ``tasks``).
        input_shape: one input's shape (linked from the data module), recorded for cost measurements.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory (stepped every training step).
        single_task_checkpoints: task name -> anchor-stage checkpoint of a single-task run; those streams
            and heads are copied in at setup (train with ``max_steps: 0`` to only assemble).
    """

    stage_name = "anchor"

    def __init__(self, backbone: Backbone, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 single_task_checkpoints: dict[str, str] | None = None) -> None:
        super().__init__(optimizer, lr_scheduler)
        if task_configs is None:
            raise ValueError("AnchorPretraining needs the tasks: link them from the data module (the CLI does)")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.set_tasks(task_configs)
        self.model = DynamicMultiTaskModel.build(backbone, self.tasks, input_shape=input_shape)
        self.single_task_checkpoints = dict(single_task_checkpoints or {})
        unknown = set(self.single_task_checkpoints) - set(self.model.tasks)
        if unknown:
            raise ValueError(f"single_task_checkpoints names tasks {sorted(unknown)} that are not among "
                             f"{self.model.tasks}")

    def setup(self, stage: str) -> None:
        for name, path in self.single_task_checkpoints.items():
            self.copy_stream(name, path)
        self.single_task_checkpoints = {}

    def copy_stream(self, name: str, path: str) -> None:
        """Copy task ``name``'s stream and head from another anchor checkpoint (one that trained it)."""
        ckpt = load_checkpoint(path)
        config = ckpt[META_KEY]["model"]
        names = [t["name"] for t in config["tasks"]]
        if name not in names:
            raise ValueError(f"checkpoint {path} has no task {name!r} (it has {names})")
        if config["backbone"] != self.model.anchor.backbone_config:
            raise ValueError(f"checkpoint {path} uses backbone {config['backbone']}, this anchor "
                             f"{self.model.anchor.backbone_config}")
        source, target = names.index(name), self.model.tasks.index(name)
        state = submodule_state(ckpt["state_dict"], "model.anchor")
        self.model.anchor.streams[target].load_state_dict(submodule_state(state, f"streams.{source}"))
        self.model.anchor.heads[target].load_state_dict(submodule_state(state, f"heads.{source}"))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.model.anchor(x)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.losses(self(batch["image"]), batch)
        loss = (self.scales * losses).sum()
        self.log("train/loss", loss, prog_bar=True)
        self.log_task_losses("train", losses)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        outputs = self(batch["image"])
        losses = self.losses(outputs, batch)
        self.log("val/loss", (self.scales * losses).sum(), prog_bar=True, sync_dist=True)
        self.log_task_losses("val", losses, sync_dist=True)
        self.update_val_metrics(outputs, batch)

