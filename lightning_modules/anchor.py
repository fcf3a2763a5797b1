"""Stage 1: train the N single-task streams of the anchor net (or assemble them from single-task runs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.backbones.base import Backbone
from dymu.checkpoint import META_KEY, load_checkpoint, submodule_state
from dymu.model import DynamicMultiTaskModel
from dymu.search_space import Architecture
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
        stream_init: ``"shared"`` starts every stream from the same weights (as the paper's streams all
            start from the same ImageNet weights), ``"independent"`` draws each stream's own.
        pretrained: a file holding one stream's block weights (``state_dict`` of the L blocks, keys
            ``"<block>.<param>"``), loaded into every stream at setup with ``weights_only=True``.
        shared_warmup_steps: first train one shared backbone (stream 0, all heads) for this many steps
            and then copy it into every stream: a stand-in for pretraining where no pretrained weights
            exist (the synthetic data). Streams that start unrelated cannot feed each other's blocks.
        random_tree_weight: after the warm-up, every step adds this weight times the task losses of a random
            tree (every parent drawn uniformly, from a generator seeded by the step) to the N streams' own
            losses, so that a block keeps accepting the other streams' features and a head the other streams'
            last block: the trees cut out of the anchor keep the streams' accuracy (docs/controllability.md,
            "Streams that can feed each other"). 0: the paper's separate single-task training. Costs a
            second forward per step.
    """

    stage_name = "anchor"

    def __init__(self, backbone: Backbone, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 single_task_checkpoints: dict[str, str] | None = None, stream_init: str = "shared",
                 pretrained: str | None = None, shared_warmup_steps: int = 0,
                 random_tree_weight: float = 0.0) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        if task_configs is None:
            raise ValueError("AnchorPretraining needs the tasks: link them from the data module (the CLI does)")
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        if stream_init not in ("shared", "independent"):
            raise ValueError(f"stream_init must be 'shared' or 'independent', got {stream_init!r}")
        if shared_warmup_steps < 0:
            raise ValueError(f"shared_warmup_steps must be >= 0, got {shared_warmup_steps}")
        if random_tree_weight < 0:
            raise ValueError(f"random_tree_weight must be >= 0, got {random_tree_weight}")
        self.backbone, self.input_shape, self.stream_init = backbone, input_shape, stream_init
        self.shared_warmup_steps, self.pretrained = shared_warmup_steps, pretrained
        self.random_tree_weight = random_tree_weight
        self.configure_stage(task_configs)
        self.single_task_checkpoints = dict(single_task_checkpoints or {})
        unknown = set(self.single_task_checkpoints) - set(self.model.tasks)
        if unknown:
            raise ValueError(f"single_task_checkpoints names tasks {sorted(unknown)} that are not among "
                             f"{self.model.tasks}")

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        """The N fresh streams and heads (every stream a copy of stream 0's weights with ``stream_init="shared"``)."""
        self.model = DynamicMultiTaskModel.build(self.backbone, self.tasks, input_shape=self.input_shape)
        if self.stream_init == "shared":
            self.copy_stream_to_all(0)

    def setup(self, stage: str) -> None:
        if self.pretrained is not None:
            self.load_pretrained(self.pretrained)
            self.pretrained = None
        for name, path in self.single_task_checkpoints.items():
            self.copy_stream(name, path)
        self.single_task_checkpoints = {}

    def copy_stream_to_all(self, source: int) -> None:
        state = self.model.anchor.streams[source].state_dict()
        for t, stream in enumerate(self.model.anchor.streams):
            if t != source:
                stream.load_state_dict(state)

    def load_pretrained(self, path: str) -> None:
        """Load one stream's block weights from ``path`` into every stream."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"pretrained weights {path} do not exist; give the path of a file saved with "
                                    "torch.save(stream_blocks.state_dict(), path)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        expected = set(self.model.anchor.streams[0].state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"pretrained weights {path} do not fit this backbone: expected keys like "
                             f"{sorted(expected)[:5]}, got {got}")
        for stream in self.model.anchor.streams:
            stream.load_state_dict(state)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.shared_warmup_steps and self.global_step == self.shared_warmup_steps:
            self.copy_stream_to_all(0)

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

    def random_tree(self) -> Architecture:
        """The random tree of this step: every parent uniform, from a generator seeded by the step (the same
        on every DDP process and after resuming)."""
        anchor = self.model.anchor
        generator = torch.Generator().manual_seed(1_000_003 * self.global_step + 17)
        return Architecture.random(anchor.n_tasks, anchor.n_layers, generator=generator)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        anchor = self.model.anchor
        warmup = self.global_step < self.shared_warmup_steps
        shared = Architecture.shared(anchor.n_tasks, anchor.n_layers) if warmup else None
        losses = self.losses(anchor(batch["image"], architecture=shared), batch)
        loss = (self.scales * losses).sum()
        if self.random_tree_weight > 0 and not warmup:
            tree_losses = self.losses(anchor(batch["image"], architecture=self.random_tree()), batch)
            loss = loss + self.random_tree_weight * (self.scales * tree_losses).sum()
            self.log("train/random_tree_loss", (self.scales * tree_losses).sum())
        self.log("train/loss", loss, prog_bar=True)
        self.log_task_losses("train", losses)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        outputs = self(batch["image"])
        losses = self.losses(outputs, batch)
        self.log("val/loss", (self.scales * losses).sum(), prog_bar=True, sync_dist=True)
        self.log_task_losses("val", losses, sync_dist=True)
        self.update_val_metrics(outputs, batch)

