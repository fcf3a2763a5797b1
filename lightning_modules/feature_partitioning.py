"""Feature partitioning (``dymu.baselines.feature_partitioning``): the partition search by distillation from the
anchor's single-task streams at the start of the fit, then the masked shared network trained to convergence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dymu.backbones.base import Backbone, build_backbone
from dymu.baselines.feature_partitioning import (
    PARTITION_KEY,
    FeaturePartitionNet,
    distillation_score,
    first_batches,
    search_partition,
)
from dymu.checkpoint import META_KEY
from dymu.model import DynamicMultiTaskModel
from lightning_modules.base import StageModule, default_optimizer

METHODS = ("es", "random")


class FeaturePartitionTraining(StageModule):
    """Searches the partition ``P`` (unless one is given), then trains the masked shared network with the
    uniform preference's ``(1/N) sum_t w_t L_t`` (``StageModule``'s preference objective and validation).

    The search runs once, at the start of the first fit (``on_fit_start``), with the anchor of
    ``anchor_checkpoint`` as the single-task teachers: ``search_budget`` candidates, each scored by
    ``distill_steps`` distillation steps on the first ``search_batches`` training batches and the task loss on
    the first ``score_batches`` validation batches. Every evaluation is logged (``search/score``,
    ``search/objective``, ``search/mean_share`` and ``search/P_{i}_{j}``); the chosen partition goes into the
    model's config and the checkpoint's metadata (``partition_from_checkpoint``). A resumed fit does not search
    again.

    Args:
        backbone: the shared network's backbone; default: the anchor checkpoint's.
        task_configs: task configs (linked from the data module).
        input_shape: one input's shape (linked from the data module); default: the anchor's.
        partition: a raw ``P`` to train without searching.
        anchor_checkpoint: the DYMU anchor stage checkpoint (the teachers; with ``loss_scales="anchor"`` also
            the scales).
        search_method: ``"es"`` or ``"random"``.
        search_budget: candidates scored.
        diag_penalty: L2 penalty on ``P``'s diagonal (sets the size).
        es_directions, es_step_size, es_noise: evolutionary strategies' settings.
        distill_steps, distill_lr, distill_layers: the distillation (``distillation_score``); ``distill_layers``
            defaults to the last third of the blocks (the paper partitions and distils the last third).
        search_batches, score_batches: training batches for the distillation, validation batches for the score.
        loss_scales, optimizer, lr_scheduler: see ``StageModule``.
        seed: seeds the search and the distillation students.
    """

    stage_name = "feature_partitioning"

    def __init__(self, backbone: Backbone | None = None, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, partition: Sequence[Sequence[float]] | None = None,
                 anchor_checkpoint: str | None = None, search_method: str = "es", search_budget: int = 32,
                 diag_penalty: float = 1e-3, es_directions: int = 16, es_step_size: float = 0.1,
                 es_noise: float = 0.05, distill_steps: int = 100, distill_lr: float = 1e-3,
                 distill_layers: int | None = None, search_batches: int = 8, score_batches: int = 2,
                 loss_scales: str = "config", optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales,
                         scales_checkpoint=anchor_checkpoint)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        if search_method not in METHODS:
            raise ValueError(f"search_method must be one of {METHODS}, got {search_method!r}")
        if min(search_budget, search_batches, score_batches, es_directions) < 1 or distill_steps < 0:
            raise ValueError("search_budget, search_batches, score_batches and es_directions must be >= 1 and "
                             "distill_steps >= 0")
        if partition is None and anchor_checkpoint is None:
            raise ValueError("feature partitioning searches P by distillation from the anchor's single-task "
                             "streams: give anchor_checkpoint (a DYMU run's anchor final.ckpt), or a partition")
        if anchor_checkpoint is None and (backbone is None or task_configs is None):
            raise ValueError("feature partitioning needs the backbone and the tasks (link them from the data "
                             "module; the CLI does)")
        self.anchor_checkpoint, self.seed = anchor_checkpoint, seed
        self.backbone, self.input_shape, self.initial_partition = backbone, input_shape, partition
        self.configure_stage(task_configs, parent=anchor_checkpoint, backbone=backbone)
        self.search_settings = {"method": search_method, "budget": search_budget, "diag_penalty": diag_penalty,
                                "directions": es_directions, "step_size": es_step_size, "noise": es_noise}
        n_layers = self.model.n_layers
        self.distill_settings = {"steps": distill_steps, "lr": distill_lr,
                                 "distill_layers": distill_layers or max(1, n_layers // 3)}
        self.search_batches, self.score_batches = search_batches, score_batches
        # persistent: a resumed fit restores it and does not search again
        self.register_buffer("searched", torch.tensor(partition is not None))

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        """The masked shared network; the backbone and the input shape default to the anchor checkpoint's."""
        if parent is not None:
            config = parent[META_KEY]["model"]
            self.backbone = self.backbone if self.backbone is not None else build_backbone(config["backbone"])
            self.input_shape = self.input_shape if self.input_shape is not None else config.get("input_shape")
        self.model = FeaturePartitionNet(self.backbone, self.tasks, self.input_shape,  # type: ignore[arg-type]
                                         partition=self.initial_partition)

    # training_step, validation: StageModule's, at the uniform preference

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the loss scales first
        if bool(self.searched):
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("the partition search needs a data module (training and validation batches)")
        teachers = DynamicMultiTaskModel.from_checkpoint(str(self.anchor_checkpoint)).anchor.to(self.device)
        teachers.requires_grad_(False)
        train = [b["image"] for b in first_batches(datamodule.train_dataloader(), self.search_batches)]
        scored = first_batches(datamodule.val_dataloader(), self.score_batches)
        scales = self.scales.detach().cpu()

        def score(p: torch.Tensor) -> float:
            return distillation_score(teachers, self.backbone, p, train, scored, self.tasks, scales,
                                      seed=self.seed, **self.distill_settings)

        result = search_partition(score, self.model.n_tasks, seed=self.seed, callback=self.log_evaluation,
                                  **self.search_settings)
        # every process scores on its own validation shard under DDP: all keep rank 0's choice
        self.model.set_partition(self.trainer.strategy.broadcast(result.partition, src=0))
        self.searched.fill_(True)

    def log_evaluation(self, record: dict[str, Any]) -> None:
        """One search evaluation to the logger (``self.log`` is not available before the first training step)."""
        if self.logger is None or not self.trainer.is_global_zero:
            return
        values = {"search/score": record["score"], "search/objective": record["objective"],
                  "search/mean_share": record["mean_share"]}
        p = record["partition"]
        values.update({f"search/P_{i}_{j}": p[i][j] for i in range(len(p)) for j in range(i, len(p))})
        self.logger.log_metrics(values, step=record["evaluation"])

    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()
        meta[PARTITION_KEY] = {
            "partition": self.model.partition, "constraints": self.model.constraints.tolist(),
            "channel_shares": self.model.channel_shares().tolist(), "searched": bool(self.searched)}
        return meta

    def on_train_epoch_start(self) -> None:
        # the partition is fixed while the weights train: log it once per epoch with the training metrics
        p = self.model.constraints
        self.log_dict({f"arch/P_{i}_{j}": float(p[i, j]) for i in range(p.shape[0]) for j in range(i, p.shape[0])})
