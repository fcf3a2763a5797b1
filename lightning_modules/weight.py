"""Stage 3: train the weight hypernet (BatchNorm shifts) over the frozen anchor and edge hypernet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dymu.backbones.base import Backbone
from dymu.checkpoint import META_KEY
from lightning_modules.base import FrozenAnchorMixin, PreferenceSampler, StageModule, default_optimizer


class WeightHypernetAdaptation(FrozenAnchorMixin, StageModule):
    """Learns ``h-bar: (r, c) -> (delta_gamma, delta_beta)`` with ``L_task(r)`` on the edge hypernet's
    maximum-likelihood tree for ``(r, c)`` (the tree inference uses).

    Only the BatchNorm heads of that tree's nodes receive gradients in a step: under DDP use
    ``strategy: ddp_find_unused_parameters_true``.

    Args:
        edge_checkpoint: the edge stage's checkpoint (holds the anchor too).
        task_configs: task configs (linked from the data module); must match the checkpoint's.
        backbone: optional; if given it must equal the checkpoint's.
        dirichlet_eta: training preferences ``r ~ Dirichlet(eta)``, ``c ~ U(0, 1)``.
        preference_groups: G; the batch is split into G groups, each trained for its own preference.
        loss_scales: ``"config"`` or ``"anchor"`` (see ``StageModule``).
        embed_dim, hidden: weight hypernet sizes.
        bn_statistics: ``"running"`` (the anchor's statistics, the default; docs/method.md, "Weight hypernet")
            or ``"batch"``.
        seed: seeds the preference sequence (and, with ``seeded_sampling``, the batches' order).
        seeded_sampling: each epoch's batch order from a generator seeded by ``(seed, epoch)`` instead of the global
            random state (the default, False); see the edge stage's argument of the same name.
        val_preferences: random preferences per ``c`` in {0, 1} at validation (plus the uniform one).
    """

    stage_name = "weight"

    def __init__(self, edge_checkpoint: str, task_configs: Sequence[dict[str, Any]] | None = None,
                 backbone: Backbone | None = None, dirichlet_eta: float = 0.2, preference_groups: int = 1,
                 loss_scales: str = "config", embed_dim: int = 32,
                 hidden: int = 100, bn_statistics: str = "running", optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0, val_preferences: int = 4,
                 seeded_sampling: bool = False) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales)
        self.sampler = PreferenceSampler(dirichlet_eta, preference_groups, seed)
        self.seed, self.num_val_preferences, self.seeded_sampling = seed, val_preferences, seeded_sampling
        # seed: not a hyperparameter to log (the data module has its own `seed`, and loggers refuse two values)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        self.weight_args = {"embed_dim": embed_dim, "hidden": hidden, "bn_statistics": bn_statistics}
        self.configure_stage(task_configs, parent=edge_checkpoint, backbone=backbone)

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        """The edge checkpoint's model plus a fresh weight hypernet (the anchor and the edge hypernet frozen)."""
        assert parent is not None
        if parent[META_KEY]["model"].get("edge") is None:
            raise ValueError(f"{self.parent['path']} holds no edge hypernet (stage "  # type: ignore[index]
                             f"{parent[META_KEY].get('stage')!r}); the weight stage starts from the edge stage's "
                             "checkpoint")
        self.model = self.build_on_parent(parent, "weight", self.weight_args)

    # training_step: StageModule's preference objective (dymu.training.weight_adaptation_loss) on the step's
    # preferences (FrozenAnchorMixin.training_preferences)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_tree_costs()
