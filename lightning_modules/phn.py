"""The PHN baseline: train the Pareto HyperNetwork (every weight of the shared network generated from ``r``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dymu.backbones.base import Backbone
from dymu.baselines.phn import ParetoHypernet
from dymu.preference import Preference
from lightning_modules.base import PreferenceSampler, StageModule, baseline_validation_preferences, default_optimizer


class ParetoHypernetTraining(StageModule):
    """Learns PHN's hypernet with linear scalarisation ``sum_t r_t w_t L_t``, ``r ~ Dirichlet(eta)``
    (``StageModule``'s preference objective over the step's ``preference_groups`` preferences); validation runs
    the uniform preference and ``val_preferences`` fixed ``r ~ Dirichlet(1)`` (PHN has no cost input ``c``).

    Args:
        backbone: the target network's backbone (one stream shared by all tasks, N heads).
        task_configs: task configs (linked from the data module's ``tasks``).
        input_shape: one input's shape (linked from the data module), for cost measurements.
        chunk_size, chunk_embed_dim, embed_dim, hidden: PHN's sizes (``dymu.baselines.phn``; match a paper's
            control-parameter count with ``dymu.baselines.phn.chunk_size_for``).
        bn_statistics: ``"batch"`` (default) or ``"running"`` (``dymu.baselines.phn``).
        dirichlet_eta: training preferences ``r ~ Dirichlet(eta)`` (0.2, the paper's).
        preference_groups: G; the batch is split into G groups, each trained for its own preference (each
            group generates its own weights).
        loss_scales: ``"config"`` or ``"anchor"`` (see ``StageModule``); anchor_checkpoint: its anchor.
        optimizer, lr_scheduler: factories (the scheduler steps every training step).
        seed: seeds the preference sequence.
        val_preferences: random preferences at validation (plus the uniform one).
    """

    stage_name = "phn"

    def __init__(self, backbone: Backbone, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, chunk_size: int = 10_000, chunk_embed_dim: int = 64,
                 embed_dim: int = 32, hidden: int = 100, bn_statistics: str = "batch", dirichlet_eta: float = 0.2,
                 preference_groups: int = 1, loss_scales: str = "config", anchor_checkpoint: str | None = None,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: LRSchedulerCallable | None = None,
                 seed: int = 0, val_preferences: int = 4) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales,
                         scales_checkpoint=anchor_checkpoint)
        self.sampler = PreferenceSampler(dirichlet_eta, preference_groups, seed)
        self.seed, self.num_val_preferences, self.anchor_checkpoint = seed, val_preferences, anchor_checkpoint
        if task_configs is None:
            raise ValueError("ParetoHypernetTraining needs the tasks: link them from the data module (the CLI does)")
        # seed: not a hyperparameter to log (the data module has its own `seed`, and loggers refuse two values)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        self.backbone, self.input_shape = backbone, input_shape
        self.sizes = {"chunk_size": chunk_size, "chunk_embed_dim": chunk_embed_dim, "embed_dim": embed_dim,
                      "hidden": hidden, "bn_statistics": bn_statistics}
        self.configure_stage(task_configs)

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        self.model = ParetoHypernet(self.backbone, self.tasks, self.input_shape, **self.sizes)

    def training_preferences(self) -> list[Preference]:
        return self.sampler.draw(self.model.n_tasks, self.global_step)

    def validation_preferences(self) -> list[Preference]:
        return baseline_validation_preferences(self.model.n_tasks, self.num_val_preferences, self.seed)
