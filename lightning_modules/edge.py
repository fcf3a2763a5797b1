"""Stage 2: train the edge hypernet over a frozen anchor (Gumbel-softmax branching + Omega)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.affinity import load_affinity
from dymu.backbones.base import Backbone
from dymu.hypernets import gumbel_samples
from dymu.preference import Preference
from dymu.regularizer import omega
from dymu.tasks import preference_loss
from lightning_modules.base import PreferenceStage, default_optimizer


class EdgeHypernetSearch(PreferenceStage):
    """Learns ``h: (r, c) -> log alpha`` with the task loss ``L_task(r)`` plus the regularizer Omega.

    Args:
        anchor_checkpoint: the anchor stage's checkpoint (its ``final.ckpt``).
        affinity: path of the RSA affinity JSON computed from that anchor.
        task_configs: task configs (linked from the data module); must match the anchor's.
        backbone: optional; if given it must equal the anchor's (a guard against mixing configs).
        tau: activity threshold; default ``0.6 / N``.
        lambda_active, lambda_inactive: weights of the two regularizer terms.
        temperature, temperature_decay, temperature_every: Gumbel temperature ``zeta`` starts at
            ``temperature`` and is multiplied by ``temperature_decay`` every ``temperature_every`` steps.
        dirichlet_eta: training preferences ``r ~ Dirichlet(eta)``, ``c ~ U(0, 1)``.
        embed_dim, hidden: edge hypernet sizes.
        seed: seeds the preference sequence.
        val_preferences: random preferences per ``c`` in {0, 1} at validation (plus the uniform one).
    """

    stage_name = "edge"

    def __init__(self, anchor_checkpoint: str, affinity: str, task_configs: Sequence[dict[str, Any]] | None = None,
                 backbone: Backbone | None = None, tau: float | None = None, lambda_active: float = 1.0,
                 lambda_inactive: float = 0.1, temperature: float = 5.0, temperature_decay: float = 0.97,
                 temperature_every: int = 300, dirichlet_eta: float = 0.2, embed_dim: int = 32,
                 hidden: int = 100, optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0, val_preferences: int = 4
                 ) -> None:
        super().__init__(optimizer, lr_scheduler, dirichlet_eta, seed, val_preferences)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler"])
        self.build_on_parent(anchor_checkpoint, task_configs, backbone, "edge",
                             {"embed_dim": embed_dim, "hidden": hidden})
        n = self.model.n_tasks
        self.tau = 0.6 / n if tau is None else float(tau)
        if temperature <= 0 or not 0 < temperature_decay <= 1 or temperature_every < 1:
            raise ValueError(f"need temperature > 0, 0 < temperature_decay <= 1, temperature_every >= 1; got "
                             f"{temperature}, {temperature_decay}, {temperature_every}")
        self.lambda_active, self.lambda_inactive = lambda_active, lambda_inactive
        self.temperature0, self.temperature_decay, self.temperature_every = temperature, temperature_decay, \
            temperature_every
        self.register_buffer("affinity", load_affinity(affinity, self.model.tasks).float())

    def temperature(self) -> float:
        return self.temperature0 * self.temperature_decay ** (self.global_step // self.temperature_every)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        pref = self.training_preference()
        r, c = pref.r_tensor(device=self.device), pref.c
        logits = self.model.edge_logits(pref)
        hard, soft = gumbel_samples(logits, self.temperature())
        losses = self.losses(self.model.anchor(batch["image"], samples=hard), batch)
        task_loss = preference_loss(losses, r, self.scales)
        reg = omega(soft, r, c, self.affinity, self.tau, self.lambda_active, self.lambda_inactive)
        loss = task_loss + reg["omega"]
        self.log_dict({"train/task_loss": task_loss, "train/omega": reg["omega"],
                       "train/omega_active": reg["active"], "train/omega_inactive": reg["inactive"],
                       "train/temperature": self.temperature(),
                       "train/expected_used_fraction": reg["usage"][:-1].mean()})
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def preference_forward(self, x: Tensor, pref: Preference) -> dict[str, Tensor]:
        with torch.no_grad():
            return self.model.anchor(x, architecture=self.model.architecture(pref))
