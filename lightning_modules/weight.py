"""Stage 3: train the weight hypernet (BatchNorm shifts) over the frozen anchor and edge hypernet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.backbones.base import Backbone
from dymu.checkpoint import META_KEY
from dymu.preference import Preference
from dymu.training import weight_adaptation_loss
from lightning_modules.base import PreferenceStage, default_optimizer


class WeightHypernetAdaptation(PreferenceStage):
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
        loss_scales: ``"config"`` or ``"anchor"`` (see ``PreferenceStage``).
        embed_dim, hidden: weight hypernet sizes.
        bn_statistics: ``"running"`` (the anchor's statistics, the default; docs/method.md, "Weight hypernet")
            or ``"batch"``.
        seed: seeds the preference sequence.
        val_preferences: random preferences per ``c`` in {0, 1} at validation (plus the uniform one).
    """

    stage_name = "weight"

    def __init__(self, edge_checkpoint: str, task_configs: Sequence[dict[str, Any]] | None = None,
                 backbone: Backbone | None = None, dirichlet_eta: float = 0.2, preference_groups: int = 1,
                 loss_scales: str = "config", embed_dim: int = 32,
                 hidden: int = 100, bn_statistics: str = "running", optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0, val_preferences: int = 4
                 ) -> None:
        super().__init__(optimizer, lr_scheduler, dirichlet_eta, seed, val_preferences, preference_groups,
                         loss_scales)
        # seed: not a hyperparameter to log (the data module has its own `seed`, and loggers refuse two values)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        ckpt = self.build_on_parent(edge_checkpoint, task_configs, backbone, "weight",
                                    {"embed_dim": embed_dim, "hidden": hidden, "bn_statistics": bn_statistics})
        if self.model.edge_hypernet is None:
            raise ValueError(f"{edge_checkpoint} holds no edge hypernet (stage {ckpt[META_KEY].get('stage')!r}); "
                             "the weight stage starts from the edge stage's checkpoint")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = weight_adaptation_loss(self.model, self.tasks, self.scales, batch, self.training_preferences())
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_task_losses("train", out["losses"])
        return out["loss"]

    def preference_forward(self, x: Tensor, pref: Preference) -> dict[str, Tensor]:
        return self.model(x, pref)
