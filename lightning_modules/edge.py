"""Stage 2: train the edge hypernet over a frozen anchor (Gumbel-softmax branching + Omega)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from dymu.affinity import load_affinity
from dymu.backbones.base import Backbone
from dymu.batched_trials import gumbel_noise, noise_generator
from dymu.captured import CapturedStep, check_compile_step, resolve_compile_step
from dymu.controller import MeasuredController, Trees, measure_path_losses, same_tree
from dymu.preference import Preference
from dymu.regularizer import layer_weights
from dymu.search_space import Architecture
from dymu.training import captured_edge_loss, edge_search_loss, preference_tensors, temperature_at
from lightning_modules.base import FrozenAnchorMixin, PreferenceSampler, StageModule, default_optimizer

SEARCHES = ("gumbel", "measured")


class EdgeHypernetSearch(FrozenAnchorMixin, StageModule):
    """Learns ``h: (r, c) -> log alpha`` with the task loss ``L_task(r)`` plus the regularizer Omega
    (``search: gumbel``, the paper's), or measures the controller that chooses trees exactly and distils it into
    ``h`` (``search: measured``, ``dymu.controller``).

    Args:
        search: ``"gumbel"``: the paper's Gumbel-softmax search (every argument below). ``"measured"``: at the
            start of training every path's validation loss is measured (needs ``N ** L <= 4096``), the
            controller's trade-off is calibrated (``floor_break_even``) and the model chooses every tree with
            it; the training steps fit the edge hypernet to the controller's trees (cross-entropy of the used
            children's parents), its amortised copy. The regularizer arguments do not apply.
        base_frugality: the controller's gamma: ``mu(c) = lambda * (gamma + (1 - gamma) c)``.
        cost_metric: what the controller's cost term counts, ``"params"`` or ``"flops"``.
        floor_break_even: the ``c`` at which the uniform preference's last sharing step (down to the cheapest
            tree) breaks even (``dymu.controller.calibrate_trade_off``).
        anchor_checkpoint: the anchor stage's checkpoint (its ``final.ckpt``).
        affinity: path of the RSA affinity JSON computed from that anchor.
        task_configs: task configs (linked from the data module); must match the anchor's.
        backbone: optional; if given it must equal the anchor's (a guard against mixing configs).
        tau: activity threshold; default ``0.6 / N``.
        lambda_active, lambda_inactive: weights of the two regularizer terms.
        temperature, temperature_decay, temperature_every: Gumbel temperature ``zeta`` starts at
            ``temperature`` and is multiplied by ``temperature_decay`` every ``temperature_every`` steps;
            ``None`` (default): every ``max_steps / 100`` steps, so any run ends at the paper's final
            temperature (5 * 0.97^100 = 0.24).
        dirichlet_eta: training preferences ``r ~ Dirichlet(eta)``, ``c ~ U(0, 1)``.
        preference_groups: G; the batch is split into G groups, each trained for its own preference in one
            batched forward (G = 1, the default: the paper's one preference per batch; the quickstart uses 8,
            measured in docs/controllability.md; a batch smaller than G gets one preference per sample).
        loss_scales: ``"config"`` (the tasks' ``w_t``) or ``"anchor"`` (``1 / L_t(anchor)``, see
            ``StageModule``).
        layer_weighting: the active loss's layer weights, ``"paper"``, ``"all"`` or ``"none"``
            (``dymu.regularizer.layer_weights``).
        pin_heads: every head keeps its own stream's last block (not searched).
        c_conditioning: ``"embedding"`` (the paper's: ``c`` in the preference embedding) or ``"affine"``
            (logits ``a(r) + c b(r)``; ``dymu.hypernets.EdgeHypernet``).
        use_affinity, task_dichotomy, use_inactive: the paper's table-6 ablations when False.
        straight_through: task loss of the hard sampled tree with the soft gradient (default), or of the soft
            mixture of parents (False).
        embed_dim, hidden: edge hypernet sizes.
        seed: seeds the preference sequence (and, with ``seeded_sampling``, the Gumbel noise and the batches' order).
        seeded_sampling: draw each step's Gumbel noise from a generator seeded by ``(seed, step)``
            (``dymu.batched_trials.noise_generator``) and each epoch's batch order from one seeded by ``(seed,
            epoch)`` (``FrozenAnchorMixin.on_train_epoch_start``) instead of the global random state (the default,
            False). A run's samples then depend on its settings alone, which is what lets ``dymu sweep
            --batch_trials K`` train K trials in one process and give each the run it would have alone.
        compile_step: the Gumbel search's training step compiled whole (``dymu.captured``): ``"off"`` (the default,
            the eager step), ``"default"`` (``torch.compile``), ``"reduce-overhead"`` (``torch.compile`` with CUDA
            graphs) or ``"auto"`` (``"reduce-overhead"`` on CUDA, ``"off"`` on CPU, where compiling measured no
            faster: docs/performance.md, "A captured edge step"). The compiled step is
            ``dymu.training.captured_edge_loss``: the same objective with static shapes, the noise drawn inside
            (or the seeded noise passed in), equal to the eager step up to rounding; a compile error falls back to
            the eager step with one warning. The first step compiles (minutes on a CPU).
        val_preferences: random preferences per ``c`` in {0, 1} at validation (plus the uniform one).
    """

    stage_name = "edge"

    def __init__(self, anchor_checkpoint: str, affinity: str, task_configs: Sequence[dict[str, Any]] | None = None,
                 backbone: Backbone | None = None, tau: float | None = None, lambda_active: float = 1.0,
                 lambda_inactive: float = 0.1, temperature: float = 5.0, temperature_decay: float = 0.97,
                 temperature_every: int | None = None, dirichlet_eta: float = 0.2, preference_groups: int = 1,
                 loss_scales: str = "config", layer_weighting: str = "paper", pin_heads: bool = False,
                 c_conditioning: str = "embedding",
                 use_affinity: bool = True, task_dichotomy: bool = True, use_inactive: bool = True,
                 straight_through: bool = True, embed_dim: int = 32, hidden: int = 100,
                 optimizer: OptimizerCallable = default_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0, val_preferences: int = 4,
                 search: str = "gumbel", base_frugality: float = 0.1, cost_metric: str = "params",
                 floor_break_even: float = 0.9, seeded_sampling: bool = False,
                 compile_step: str = "off") -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales)
        self.sampler = PreferenceSampler(dirichlet_eta, preference_groups, seed)
        self.seed, self.num_val_preferences, self.seeded_sampling = seed, val_preferences, seeded_sampling
        self.compile_step = check_compile_step(compile_step)
        self.captured: CapturedStep | None = None  # built at the first compiled step (the device is known then)
        self.step_mode: str | None = None  # what compile_step means on this device, resolved then
        # seed: not a hyperparameter to log (the data module has its own `seed`, and loggers refuse two values)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        self.edge_args: dict[str, Any] = {"embed_dim": embed_dim, "hidden": hidden}
        if pin_heads:
            self.edge_args["pin_heads"] = True
        if c_conditioning != "embedding":
            self.edge_args["c_conditioning"] = c_conditioning
        self.configure_stage(task_configs, parent=anchor_checkpoint, backbone=backbone)
        n = self.model.n_tasks
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        self.search, self.floor_break_even = search, floor_break_even
        self.calibration: dict[str, Any] | None = None
        if search == "measured":
            if self.model.input_shape is None:
                raise ValueError("search: measured needs the anchor's input shape (for the costs): retrain the anchor "
                                 "with this version")
            self.model.controller = MeasuredController(n, self.model.anchor.n_layers, base_frugality, cost_metric)
        self.tau = 0.6 / n if tau is None else float(tau)
        if temperature <= 0 or not 0 < temperature_decay <= 1 or (temperature_every is not None
                                                                   and temperature_every < 1):
            raise ValueError(f"need temperature > 0, 0 < temperature_decay <= 1, temperature_every >= 1 or null; "
                             f"got {temperature}, {temperature_decay}, {temperature_every}")
        layer_weights(self.model.anchor.n_layers, layer_weighting)  # a clear error for an unknown weighting now
        self.temperature0, self.temperature_decay, self.temperature_every = temperature, temperature_decay, \
            temperature_every
        self.regularizer = {"tau": self.tau, "lambda_active": lambda_active, "lambda_inactive": lambda_inactive,
                            "layer_weighting": layer_weighting, "use_affinity": use_affinity,
                            "task_dichotomy": task_dichotomy, "use_inactive": use_inactive}
        self.straight_through = straight_through
        self.register_buffer("affinity", load_affinity(affinity, self.model.tasks).float())

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        """The anchor checkpoint's model plus a fresh edge hypernet (the anchor frozen)."""
        assert parent is not None
        self.model = self.build_on_parent(parent, "edge", self.edge_args)

    def temperature(self) -> float:
        total = 0
        if self._trainer is not None and self.temperature_every is None:
            estimated = self.trainer.estimated_stepping_batches
            if estimated == float("inf"):
                raise ValueError("the temperature schedule is tied to the step budget, but this run has none: set "
                                 "trainer.max_steps (or max_epochs), or model.temperature_every")
            total = int(estimated)
        return temperature_at(self.global_step, total, self.temperature0, self.temperature_decay,
                              self.temperature_every)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the loss scales first
        if self.search == "measured":
            self.measure_controller()

    @torch.no_grad()
    def measure_controller(self) -> None:
        """Every path's validation losses (summed over DDP processes), then the calibrated trade-off."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError("search: measured needs a data module with a validation set")
        sums, supports = measure_path_losses(self.model.anchor, self.tasks, datamodule.val_dataloader(),
                                             self.device)
        sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        supports = self.trainer.strategy.reduce(supports.to(self.device), reduce_op="sum").cpu()
        controller = self.model.controller
        controller.set_measurement(sums.double(), supports.double())
        self.calibration = controller.calibrate(self.model.node_costs(), self.floor_break_even)
        if self.trainer.is_global_zero:
            quartiles = ", ".join(f"{v:.2f}" for v in self.calibration["break_even_c_quartiles"])
            print(f"[dymu] edge: measured {controller.path_loss_sums.shape[0]} paths; trade-off lambda "
                  f"{self.calibration['trade_off']:.4g}, sharing steps break even at c = {quartiles} (quartiles)")

    def distillation_step(self) -> Tensor:
        """Cross-entropy of the edge hypernet's parent choices against the controller's trees (used children
        only: the others do not change the tree)."""
        r, c = preference_tensors(self.training_preferences(), self.device)
        targets = self.model.controller.solve_many(r.cpu(), c.cpu(), self.model.node_costs()).to(self.device)
        logits = self.model.edge_hypernet(r, c)  # (G, L, N, N)
        used = Trees(targets.cpu()).children.to(self.device)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
        loss = (nll * used.flatten()).sum() / used.sum()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.search == "measured":
            return self.distillation_step()
        temperature = self.temperature()
        out = self.captured_loss(batch, temperature)
        if out is None:
            out = edge_search_loss(self.model.anchor, self.model.edge_hypernet, self.tasks, self.scales, batch,
                                   self.training_preferences(), temperature, self.affinity, self.regularizer,
                                   noise=self.step_noise(), straight_through=self.straight_through)
        self.log_dict({"train/task_loss": out["task_loss"], "train/omega": out["omega"],
                       "train/omega_active": out["active"], "train/omega_inactive": out["inactive"],
                       "train/temperature": temperature,
                       "train/expected_used_fraction": out["expected_used_fraction"]})
        self.log("train/loss", out["loss"], prog_bar=True)
        return out["loss"]

    def captured_loss(self, batch: dict[str, Tensor], temperature: float) -> dict[str, Tensor] | None:
        """The step's objective from the compiled ``captured_edge_loss`` (``compile_step``); None where the
        setting means ``"off"`` on this device or compiling failed (the caller runs the eager step)."""
        if self.step_mode is None:
            self.step_mode = resolve_compile_step(self.compile_step, self.device)
        if self.step_mode == "off":
            return None
        if self.captured is None:
            self.captured = CapturedStep(captured_edge_loss, self.step_mode, "edge")
        r, c = preference_tensors(self.training_preferences(), "cpu")
        tensors = {key: value for key, value in batch.items() if isinstance(value, Tensor)}
        return self.captured(self.model.anchor, self.model.edge_hypernet, self.tasks, self.scales, tensors,
                             r.to(self.device), c.to(self.device),
                             torch.tensor(temperature, dtype=torch.float32, device=self.device), self.affinity,
                             self.regularizer, self.step_noise(), self.straight_through)

    def step_noise(self) -> Tensor | None:
        """With ``seeded_sampling``: this step's standard Gumbel noise ``(G, L, N, N)`` from the generator seeded by
        ``(seed, step)`` (what ``dymu.batched_trials.BatchedEdgeTrials`` draws for the same trial); else None
        (``edge_search_loss`` draws it from the global random state)."""
        if not self.seeded_sampling:
            return None
        n = self.model.n_tasks
        shape = (self.sampler.groups, self.model.anchor.n_layers, n, n)
        return gumbel_noise(shape, noise_generator(self.seed, self.global_step, self.device), self.device)

    def preference_forward(self, x: Tensor, pref: Preference) -> dict[str, Tensor]:
        with torch.no_grad():
            return self.model.anchor(x, architecture=self.model.architecture(pref))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_tree_costs()
        if self.search == "measured" and self.model.controller.supports.sum() > 0:
            prefs = self.validation_preferences()
            agree = [same_tree(Architecture.from_logits(self.model.edge_logits(p)), self.model.architecture(p))
                     for p in prefs]
            self.log("val/hypernet_agreement", sum(agree) / len(agree))

    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()
        if self.calibration is not None:
            meta["calibration"] = self.calibration
        return meta
