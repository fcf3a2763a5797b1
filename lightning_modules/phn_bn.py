"""The PHN-BN baseline: a BatchNorm hypernet over a frozen shared network (trained at the uniform preference
by the ``shared_mtl`` stage)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dymu.backbones.base import Backbone, build_backbone
from dymu.baselines.phn_bn import PhnBnNet
from dymu.baselines.static import StaticMultiTaskNet
from dymu.checkpoint import META_KEY, submodule_state
from dymu.preference import Preference
from dymu.tasks import tasks_from_config
from lightning_modules.base import PreferenceSampler, StageModule, baseline_validation_preferences, default_optimizer


class PhnBnTraining(StageModule):
    """Learns PHN-BN's hypernet ``r -> (delta_gamma, delta_beta)`` with ``sum_t r_t w_t L_t``,
    ``r ~ Dirichlet(eta)``; the shared network is frozen.

    Args:
        shared_checkpoint: the ``shared_mtl`` stage's checkpoint (the shared network at the uniform preference).
        task_configs: task configs (linked from the data module); must match the checkpoint's.
        backbone: optional; if given it must equal the checkpoint's.
        embed_dim, hidden: the hypernet's sizes (the weight hypernet's).
        bn_statistics: ``"running"`` (the frozen network's statistics, default) or ``"batch"``.
        modulate_heads: shift the heads' BatchNorms too (default), not only the blocks'.
        dirichlet_eta, preference_groups, loss_scales, anchor_checkpoint, optimizer, lr_scheduler, seed,
            val_preferences: as ``ParetoHypernetTraining``'s.
    """

    stage_name = "phn_bn"

    def __init__(self, shared_checkpoint: str, task_configs: Sequence[dict[str, Any]] | None = None,
                 backbone: Backbone | None = None, embed_dim: int = 32, hidden: int = 100,
                 bn_statistics: str = "running", modulate_heads: bool = True, dirichlet_eta: float = 0.2,
                 preference_groups: int = 1, loss_scales: str = "config", anchor_checkpoint: str | None = None,
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: LRSchedulerCallable | None = None,
                 seed: int = 0, val_preferences: int = 4) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales,
                         scales_checkpoint=anchor_checkpoint)
        self.sampler = PreferenceSampler(dirichlet_eta, preference_groups, seed)
        self.seed, self.num_val_preferences, self.anchor_checkpoint = seed, val_preferences, anchor_checkpoint
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        self.sizes = {"embed_dim": embed_dim, "hidden": hidden, "bn_statistics": bn_statistics,
                      "modulate_heads": modulate_heads}
        self.configure_stage(task_configs, parent=shared_checkpoint, backbone=backbone)

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        """PHN-BN's hypernet over the shared network of ``parent`` (frozen)."""
        assert parent is not None
        config = parent[META_KEY]["model"]
        if config.get("baseline") != StaticMultiTaskNet.kind:
            raise ValueError(f"{self.parent['path']} holds no shared multi-task "  # type: ignore[index]
                             f"network (stage {parent[META_KEY].get('stage')!r}); PHN-BN starts from the shared_mtl "
                             "stage's checkpoint")
        self.model = PhnBnNet(build_backbone(config["backbone"]), tasks_from_config(config["tasks"]),
                              config.get("input_shape"), **self.sizes)
        self.model.load_frozen(submodule_state(parent["state_dict"], "model.net"))

    def training_preferences(self) -> list[Preference]:
        return self.sampler.draw(self.model.n_tasks, self.global_step)

    def validation_preferences(self) -> list[Preference]:
        return baseline_validation_preferences(self.model.n_tasks, self.num_val_preferences, self.seed)
