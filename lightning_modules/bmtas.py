"""The BMTAS search (``dymu.baselines.bmtas``): warm-up, then alternating architecture and weight updates on a
fixed 20 / 80 split of the training data (the data module's ``holdout``), the proxyless resource loss, a linear
temperature schedule."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from dymu.anchor import batch_statistics
from dymu.backbones.base import Backbone
from dymu.baselines.bmtas import BmtasNet, reassigned_groups
from dymu.checkpoint import META_KEY
from lightning_modules.base import FoundTreeMixin, StageModule, check_tree_init


def bmtas_optimizer(params: Any) -> torch.optim.Optimizer:
    """The weights' optimizer of the authors' search code: Adam, learning rate 1e-3, weight decay 1e-4."""
    return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)


def linear_temperature(step: int, total_steps: int, warmup_steps: int, start: float = 5.0, end: float = 0.1) -> float:
    """The paper's schedule: ``start`` until the search begins, then linear to ``end`` at ``total_steps``."""
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0, step - warmup_steps) / span)
    return start + (end - start) * progress


ARCH_STEPS = ("batch", "phase")


@contextmanager
def on_batch_statistics(models: Sequence[BmtasNet]) -> Iterator[None]:
    """Within the block, the streams' BatchNorms of every supergraph in ``models`` use batch statistics (the
    architecture phases and the restarts' selection); each one's cost is measured first, at batch 1, before
    BatchNorm1d on batch statistics would refuse it."""
    with ExitStack() as stack:
        for model in models:
            model.expected_cost()
            stack.enter_context(batch_statistics(model.anchor))
        yield


class BmtasSearch(FoundTreeMixin, StageModule):
    """BMTAS: per-task routings through the anchor's supergraph, searched with the resource loss.

    Schedule (the paper's appendix A and the authors' code): the first ``warmup_steps`` weight steps train every
    stream on its own task; after them, every training epoch starts with an architecture phase, a pass over the
    architecture split (a fixed ``arch_fraction`` of the training set, seeded by ``seed``) updating only the
    routing logits with ``sum_t w_t L_t / N + resource_weight * resource_loss`` (the task loss averaged over
    ``arch_samples`` Gumbel samples; Adam ``arch_lr``, weight decay
    ``arch_weight_decay``, its moments reset at every phase unless ``reset_arch_optimizer`` is off, BatchNorms
    of the streams on batch statistics);
    then the weights train on the remaining training data (the trainer's batches) with the task loss alone,
    their optimizer state and the streams' BatchNorm running statistics reset after each architecture phase
    because the architecture changed. The Gumbel-softmax temperature falls linearly from ``temperature_start``
    to ``temperature_end`` over the steps after the warm-up. One weight step per batch updates every task's
    forward together (the paper steps after each task's).

    The split: at ``setup`` the data module holds the architecture split out (``MultiTaskDataModule.holdout``,
    seeded by ``seed``), so that its ``train_dataloader`` serves the weight split, and this module keeps the loader
    over the architecture split; it needs a dymu data module.

    Args:
        backbone, task_configs, input_shape, anchor_checkpoint, init: see ``LearnToBranchSearch``.
        resource_weight: lambda; larger finds smaller trees (the paper's BMTAS-1/2/3 are three lambdas).
        resource: ``"flops"`` or ``"params"`` (what the resource loss counts).
        warmup_steps: weight steps of each stream on its own task before the search; default: none when the
            streams come from an anchor (they are its single-task networks), 5 % of the steps from scratch (the
            authors' code: a twentieth of the epochs).
        temperature_start, temperature_end: the linear temperature schedule.
        arch_fraction: the architecture split's share of the training set.
        arch_lr, arch_weight_decay: the routing logits' Adam.
        loss_scales: ``"config"`` or ``"anchor"`` (see ``StageModule``).
        optimizer: the weights' optimizer factory (default: Adam 1e-3, weight decay 1e-4).
        lr_scheduler: optional scheduler factory (stepped every weight step).
        seed: seeds the architecture split.
        reset_arch_optimizer: reset the routing logits' Adam moments at every architecture phase (the authors'
            code, default); ``False`` keeps them across phases (docs/results.md, "BMTAS on a held-out grouping":
            with this data's 4-batch phases a reset makes every arch step a near sign step).
        arch_samples: Gumbel samples per architecture batch, the step's task loss their mean (default 1, the
            authors'). More samples cut the sample's part of the gradient's noise (docs/results.md, "BMTAS on a
            held-out grouping": signal-to-noise 0.57 -> 0.87 with 4), but on that grouping 4 did not find it more
            often than 1 over 13 and 10 runs, so it is an option.
        arch_step: ``"batch"`` (a routing step per architecture batch, the authors') or ``"phase"`` (one step per
            phase on the phase's mean gradient).
        resource_ramp: the share of the search (the steps after the warm-up) over which lambda rises linearly
            from 0; 0 (default): the full weight from the first search step.
        weight_uniform_share: the uniform mixture's share in every task's routing weights during the weight
            steps (``BmtasNet.search_forward``'s ``uniform_share``), so that candidates no task chose keep
            training; 0 (default): the sampled routing only.
        restarts: independent searches trained side by side on the same batches and architecture split, each
            with its own supergraph, Gumbel noise and (from scratch) initial weights. After the last step the one
            whose found tree has the smallest objective on the architecture split (``found_objectives``: the
            uniform preference's task loss with the tree, BatchNorms on batch statistics, plus ``resource_weight``
            times its resource loss) becomes ``model`` (``select_restart``); the others stay in
            ``restart_models``, and the checkpoint's metadata records every restart's objective and tree. Costs
            ``restarts`` times the compute and memory of one search. 1 (default): the authors' single search.
            On a close grouping one search reaches its objective's minimum about 6 times in 10; with 5 restarts
            BMTAS found it in every run measured (docs/results.md, "BMTAS on a held-out grouping"), so use 5
            where the grouping itself is the result. During the search, the logged routing distribution is
            restart 0's, the losses the restarts' mean.
    """

    stage_name = "bmtas"

    def __init__(self, backbone: Backbone | None = None, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, anchor_checkpoint: str | None = None,
                 init: str = "anchor", resource_weight: float = 0.5, resource: str = "flops",
                 warmup_steps: int | None = None, temperature_start: float = 5.0, temperature_end: float = 0.1,
                 arch_fraction: float = 0.2, arch_lr: float = 0.01, arch_weight_decay: float = 5e-5,
                 loss_scales: str = "config", optimizer: OptimizerCallable = bmtas_optimizer,
                 lr_scheduler: LRSchedulerCallable | None = None, seed: int = 0,
                 reset_arch_optimizer: bool = True, arch_samples: int = 1, resource_ramp: float = 0.0,
                 arch_step: str = "batch", weight_uniform_share: float = 0.0, restarts: int = 1) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales,
                         scales_checkpoint=anchor_checkpoint)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        if resource_weight < 0 or (warmup_steps is not None and warmup_steps < 0) or not (
                temperature_start > 0 and temperature_end > 0) or arch_lr <= 0:
            raise ValueError(f"need resource_weight >= 0, warmup_steps >= 0, positive temperatures and arch_lr > 0; "
                             f"got {resource_weight}, {warmup_steps}, {temperature_start}, {temperature_end}, "
                             f"{arch_lr}")
        if arch_samples < 1 or not 0 <= resource_ramp <= 1 or arch_step not in ARCH_STEPS or not (
                0 <= weight_uniform_share <= 1):
            raise ValueError(f"need arch_samples >= 1, resource_ramp in [0, 1], weight_uniform_share in [0, 1] and "
                             f"arch_step in {ARCH_STEPS}; got {arch_samples}, {resource_ramp}, {weight_uniform_share}, "
                             f"{arch_step!r}")
        if restarts < 1:
            raise ValueError(f"restarts (independent searches) must be at least 1, got {restarts}")
        if not 0 < arch_fraction < 1:
            raise ValueError(f"arch_fraction (the architecture split's share) must lie in (0, 1), got {arch_fraction}")
        self.resource_weight, self.init, self.seed = resource_weight, init, seed
        self.warmup_setting = warmup_steps
        self.temperature_start, self.temperature_end = temperature_start, temperature_end
        self.arch_fraction, self.arch_lr, self.arch_weight_decay = arch_fraction, arch_lr, arch_weight_decay
        self.reset_arch_optimizer = reset_arch_optimizer
        self.arch_samples, self.resource_ramp, self.arch_step = arch_samples, resource_ramp, arch_step
        self.weight_uniform_share = weight_uniform_share
        self.restarts = restarts
        self.restart_selection: dict[str, Any] | None = None  # select_restart's record, once made
        check_tree_init(self.stage_name, init, anchor_checkpoint, backbone, task_configs)
        self.anchor_checkpoint, self.backbone, self.input_shape = anchor_checkpoint, backbone, input_shape
        self.resource = resource
        self.configure_stage(task_configs, parent=anchor_checkpoint, backbone=backbone)
        self.arch_loader: DataLoader | None = None
        self.arch_optimizer: torch.optim.Optimizer | None = None
        self._last_arch_epoch = -1

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        def build() -> BmtasNet:
            return self.build_supergraph(BmtasNet, parent, self.backbone, self.input_shape, self.init,
                                         resource=self.resource)

        self.model = build()
        self.restart_models = nn.ModuleList([build() for _ in range(self.restarts - 1)])

    def searches(self) -> list[BmtasNet]:
        """The supergraphs searched side by side: ``model`` (restart 0), then ``restart_models``."""
        return [self.model, *self.restart_models]  # type: ignore[list-item]

    def optimizer_parameters(self) -> Any:
        return [p for model in self.searches() for p in model.weight_parameters()]

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.arch_loader is not None:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "holdout"):
            raise ValueError("BMTAS splits the training set into weight and architecture parts: fit it with a "
                             "dymu data module (one with holdout())")
        try:
            self.arch_loader = datamodule.holdout(self.arch_fraction, self.seed)  # the trainer's: the weight split
        except ValueError as error:
            raise ValueError(f"BMTAS's architecture split (arch_fraction): {error}") from error

    def warmup_steps(self) -> int:
        if self.warmup_setting is not None:
            return self.warmup_setting
        return 0 if self.init == "anchor" else int(self.total_steps()) // 20

    def total_steps(self) -> int:
        estimated = self.trainer.estimated_stepping_batches
        if estimated == float("inf"):
            raise ValueError("BMTAS's temperature schedule is tied to the step budget: set trainer.max_steps or "
                             "max_epochs")
        return int(estimated)

    def temperature(self) -> float:
        return linear_temperature(self.global_step, self.total_steps(), self.warmup_steps(),
                                  self.temperature_start, self.temperature_end)

    def current_resource_weight(self) -> float:
        """lambda, ramped linearly from 0 over the first ``resource_ramp`` of the steps after the warm-up."""
        if self.resource_ramp == 0:
            return self.resource_weight
        span = self.resource_ramp * max(1, self.total_steps() - self.warmup_steps())
        return self.resource_weight * min(1.0, max(0, self.global_step - self.warmup_steps()) / span)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        warmup = self.warmup_steps()
        if self.global_step < warmup:  # each stream its own task
            results = [self.task_objective(model.anchor(batch["image"]), batch) for model in self.searches()]
        else:
            if self.current_epoch != self._last_arch_epoch:
                self.architecture_phase()
                self._last_arch_epoch = self.current_epoch
            temperature = self.temperature()
            results = [self.task_objective(model.search_forward(batch["image"], temperature,
                                                                uniform_share=self.weight_uniform_share), batch)
                       for model in self.searches()]
            self.log("train/temperature", temperature)
        # the restarts share no parameter: the sum's gradient is each one's own
        loss = sum(objective for objective, _ in results)
        self.log("train/loss", loss / len(results), prog_bar=True)
        self.log_task_losses("train", torch.stack([losses for _, losses in results]).mean(dim=0))
        if self.logging_step():
            self.log_distribution()
        return loss

    def routing_gradient(self, model: BmtasNet, batch: dict[str, Tensor], temperature: float,
                         weight: float) -> tuple[Tensor, Tensor, Tensor]:
        """One architecture batch's gradient on ``model``'s routing logits, with its task and resource losses.

        Only the logits' gradient (the weights' gradients and DDP's hooks stay untouched), one sample's graph at a
        time: the mean task loss over ``arch_samples`` Gumbel samples, plus ``weight`` times the resource loss."""
        samples, logits = self.arch_samples, model.logits
        first, _ = self.task_objective(model.search_forward(batch["image"], temperature), batch)
        resource = model.resource_loss()
        (grad,) = torch.autograd.grad(first / samples + weight * resource, [logits])
        task_loss = first.detach() / samples
        for _ in range(samples - 1):
            sample_loss, _ = self.task_objective(model.search_forward(batch["image"], temperature), batch)
            grad = grad + torch.autograd.grad(sample_loss / samples, [logits])[0]
            task_loss = task_loss + sample_loss.detach() / samples
        return grad, task_loss, resource.detach()

    def architecture_phase(self) -> None:
        """One pass over the architecture split updating the routing logits only (module docstring)."""
        assert self.arch_loader is not None, "setup('fit') builds the architecture split"
        models = self.searches()
        logits = [model.logits for model in models]
        if self.arch_optimizer is None or self.reset_arch_optimizer:
            self.arch_optimizer = torch.optim.Adam(logits, lr=self.arch_lr, weight_decay=self.arch_weight_decay)
        temperature, weight = self.temperature(), self.current_resource_weight()
        totals = []
        n_batches = len(self.arch_loader)
        per_step = 1 if self.arch_step == "batch" else n_batches  # batches averaged into one routing step
        pending: list[Tensor | None] = [None] * len(models)
        with on_batch_statistics(models):
            for index, batch in enumerate(self.arch_loader):
                batch = move_data_to_device(batch, self.device)
                for k, model in enumerate(models):
                    grad, task_loss, resource = self.routing_gradient(model, batch, temperature, weight)
                    # a step per batch, or one per phase on the phase's mean gradient (arch_step)
                    share = grad / per_step
                    pending[k] = share if pending[k] is None else pending[k] + share
                    totals.append(torch.stack([task_loss + weight * resource, task_loss, resource]))
                if self.arch_step == "batch" or index == n_batches - 1:
                    for k, model in enumerate(models):
                        model.logits.grad = self.trainer.strategy.reduce(pending[k], reduce_op="mean")
                    self.arch_optimizer.step()
                    for model in models:
                        model.logits.grad = None
                    pending = [None] * len(models)
        # the architecture changed: fresh weight-optimizer moments and BatchNorm statistics (appendix A)
        for optimizer in self.trainer.optimizers:
            optimizer.state = defaultdict(dict)
        for model in models:
            for module in model.anchor.streams.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
        if totals:
            mean = torch.stack(totals).mean(dim=0)
            self.log_dict({"arch/loss": mean[0], "arch/task_loss": mean[1], "arch/resource_loss": mean[2]})

    def selection_loader(self) -> DataLoader:
        """The architecture split in a fixed order with the evaluation transform, full batches only (BatchNorm on
        batch statistics), the same on every DDP process: what ``found_objectives`` scores the restarts on."""
        assert self.arch_loader is not None, "setup('fit') builds the architecture split"
        datamodule = self.trainer.datamodule
        split = Subset(datamodule.dataset("train", train=False), self.arch_loader.dataset.indices)
        return DataLoader(split, batch_size=self.arch_loader.batch_size, shuffle=False, drop_last=True,
                          collate_fn=datamodule.collate)

    @torch.no_grad()
    def found_objectives(self) -> list[float]:
        """Each restart's objective at its found tree, on the architecture split (``selection_loader``): the
        uniform preference's task loss with the tree (the streams' BatchNorms on batch statistics, as in the
        architecture phases; the mean over the split's batches) plus ``resource_weight`` times the tree's
        resource loss."""
        models = self.searches()
        totals = torch.zeros(len(models), dtype=torch.float64)
        batches = 0
        with on_batch_statistics(models):
            for batch in self.selection_loader():
                batch = move_data_to_device(batch, self.device)
                for k, model in enumerate(models):
                    totals[k] += float(self.task_objective(model(batch["image"]), batch)[0])
                batches += 1
        return [float(totals[k]) / batches + self.resource_weight * float(model.found_resource_loss())
                for k, model in enumerate(models)]

    def select_restart(self, log: bool = True) -> None:
        """Keep the restart whose found tree has the smallest ``found_objectives`` as ``model`` (its state swapped
        with restart 0's; the first on a tie); once, after the last step (``log``: log the choice, where Lightning
        allows it)."""
        if self.restarts == 1 or self.restart_selection is not None:
            return
        objectives = self.found_objectives()
        best = min(range(len(objectives)), key=objectives.__getitem__)
        self.restart_selection = {"objectives": objectives, "selected": best,
                                  "routings": [model.routing() for model in self.searches()]}
        if best:
            chosen = self.restart_models[best - 1]
            first = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(chosen.state_dict())
            chosen.load_state_dict(first)
        if log:
            self.log_dict({"arch/selected_restart": float(best), "arch/found_objective": objectives[best]})

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.restarts > 1 and self.global_step >= self.total_steps():
            self.select_restart()  # before the last validation, so that it scores the kept search

    def on_train_end(self) -> None:
        self.select_restart(log=False)  # a fit that ended before its step budget (max_time, an early stop)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_found_tree()

    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()  # with the found tree (``found_architecture``)
        routing = self.model.routing()
        meta["bmtas"] = {"routing": routing, "reassigned_groups": reassigned_groups(routing)}
        if self.restart_selection is not None:
            meta["bmtas"]["restarts"] = self.restart_selection
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.restart_selection = checkpoint.get(META_KEY, {}).get("bmtas", {}).get("restarts")

    @torch.no_grad()
    def log_distribution(self) -> None:
        """Every task's candidate probabilities ``arch/layer{l}/task{t}/stream{s}``, the expected encoder cost over
        N separate encoders, the number of used nodes of the found tree and of its groups moved off their
        chosen candidate (``dymu.baselines.bmtas.reassigned_groups``)."""
        probs = self.model.candidate_probabilities()
        values: dict[str, Any] = {f"arch/layer{k}/task{t}/stream{s}": probs[k, t, s]
                                  for k in range(probs.shape[0]) for t in range(probs.shape[1])
                                  for s in range(probs.shape[2])}
        if self.model.input_shape is not None:
            values["arch/expected_cost_fraction"] = self.model.resource_loss()
        values["arch/used_nodes"] = float(self.model.architecture().num_used_nodes())
        values["arch/reassigned_groups"] = float(reassigned_groups(self.model.routing()))
        self.log_dict(values)
