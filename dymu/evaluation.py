"""The evaluation protocol (docs/method.md, "Evaluation protocol") in plain torch: loss vectors per preference,
hypervolume, uniformity, and the inference cost over many preferences.

The test losses of every evaluated configuration are accumulated in one pass over the data (``LossSums``):
each ``Evaluated`` pair (a method and a preference) names the configuration that computes it (``key``), so
pairs whose losses cannot differ (the same tree without adaptation) share one accumulator, and
``configuration_forwards`` builds each configuration's forward once (trees, BatchNorm shifts, recalibrated
trees). The sums are fixed-size, whatever the data set's size, and add up over DDP processes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from dymu.anchor import recalibrate_batchnorm
from dymu.metrics import hypervolume, hypervolume_method, mean_uniformity
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.search_space import Architecture
from dymu.tasks import Task, task_losses, task_scales

Batch = dict[str, Tensor]
Forward = Callable[[Tensor], dict[str, Tensor]]


def batch_supports(tasks: Sequence[Task], batch: Batch, device: torch.device | str = "cpu") -> Tensor:
    """``Task.support`` of every task on one batch (the valid pixels or labelled samples each batch loss
    averages over), float64 ``(N,)`` on ``device``."""
    return torch.tensor([float(t.support(batch[t.name])) for t in tasks], dtype=torch.float64, device=device)


def batch_loss_sums(forward: Forward, batch: Batch, tasks: Sequence[Task], supports: Tensor) -> Tensor:
    """One batch's unscaled losses weighted by their ``supports`` (``batch_supports``), float64 ``(N,)`` on
    the supports' device: summed over batches and divided by the summed supports, the data set's mean."""
    losses = task_losses(list(tasks), forward(batch["image"]), batch).double().to(supports.device)
    return torch.where(supports > 0, losses * supports, 0.0)  # a loss over no valid target is undefined


@torch.no_grad()
def task_loss_sums(forward: Forward, batches: Iterable[Batch], tasks: Sequence[Task],
                   device: torch.device | str = "cpu", allow_empty: bool = False) -> tuple[Tensor, Tensor]:
    """Support-weighted sums of the unscaled batch losses and the supports (``batch_loss_sums``), float64
    ``(N,)`` each on the CPU; sums from several processes add up to the whole data set's (one process's
    shard may be empty with ``allow_empty``)."""
    tasks = list(tasks)
    total = torch.zeros(len(tasks), dtype=torch.float64)
    support = torch.zeros(len(tasks), dtype=torch.float64)
    num_batches = 0
    for batch in batches:
        num_batches += 1
        batch = {k: v.to(device) for k, v in batch.items()}
        counts = batch_supports(tasks, batch)
        total += batch_loss_sums(forward, batch, tasks, counts)
        support += counts
    if num_batches == 0 and not allow_empty:
        raise ValueError("the evaluation data set is empty")
    return total, support


def losses_from_sums(total: Tensor, support: Tensor, tasks: Sequence[Task]) -> Tensor:
    """The data set's mean losses ``[L_t]`` from ``task_loss_sums``; an error names a task without targets."""
    empty = [t.name for t, n in zip(tasks, support) if n == 0]
    if empty:
        raise ValueError(f"the evaluation data set has no valid target for task(s) {empty}")
    return (total / support).float()


def mean_task_losses(forward: Forward, batches: Iterable[Batch], tasks: Sequence[Task],
                     device: torch.device | str = "cpu") -> Tensor:
    """Unscaled losses ``[L_t]`` over a data set: each batch loss weighted by its support, so the result is
    the data set's own mean."""
    return losses_from_sums(*task_loss_sums(forward, batches, tasks, device), tasks)


def scaled(losses: Tensor, tasks: Sequence[Task]) -> list[float]:
    """The loss vector of the protocol (docs/method.md, "Evaluation protocol"): ``[w_t * L_t]``."""
    return (losses * task_scales(list(tasks))).tolist()


@dataclass(frozen=True)
class Variant:
    """One method of the protocol's records: its ``method`` name and whether the BatchNorms are adapted."""

    method: str
    adaptation: bool


ANCHOR = Variant("single-task anchor", False)
"""The N single-task networks (every preference gets the anchor's tree)."""
TREE = Variant("dymu", False)
"""The preference's tree on the anchor's BatchNorms."""
ADAPTED = Variant("dymu", True)
"""The preference's tree with the weight hypernet's BatchNorm shifts."""
RECALIBRATED = Variant("dymu, recalibrated BN", False)
"""The preference's tree with its BatchNorm statistics re-estimated on a few training batches."""


def protocol_variants(model: DynamicMultiTaskModel, recalibrate: bool) -> list[Variant]:
    """The methods scored at each ``c``, in record order: the anchor, dymu without adaptation, with it (when
    the model has a weight hypernet) and with recalibrated BatchNorm statistics (when asked)."""
    adapted = [ADAPTED] if model.weight_hypernet is not None else []
    return [ANCHOR, TREE, *adapted, *([RECALIBRATED] if recalibrate else [])]


@dataclass(frozen=True)
class Evaluated:
    """One preference scored by one method, with the tree it runs (``model.architecture``; the anchor's
    for ``ANCHOR``)."""

    variant: Variant
    preference: Preference
    architecture: Architecture

    @classmethod
    def create(cls, model: DynamicMultiTaskModel, variant: Variant, preference: Preference,
               budget: float | None = None, budget_metric: str = "params") -> Evaluated:
        """``budget``: the tree within that fraction of the anchor's ``budget_metric`` (``model.architecture``)."""
        arch = (Architecture.anchor(model.n_tasks, model.anchor.n_layers) if variant == ANCHOR
                else model.architecture(preference, budget=budget, budget_metric=budget_metric))
        return cls(variant, preference, arch)

    @property
    def key(self) -> Hashable:
        """The configuration whose losses these are: without adaptation they depend only on the tree (the
        anchor is the tree of N separate streams), with adaptation on the preference."""
        if self.variant == ADAPTED:
            return ("adapted", self.preference, self.architecture)
        if self.variant == RECALIBRATED:
            return ("recalibrated", self.architecture)
        return ("tree", self.architecture)


@torch.no_grad()
def configuration_forwards(model: DynamicMultiTaskModel, evaluated: Iterable[Evaluated],
                           calibration: Sequence[Tensor] | None = None) -> dict[Hashable, Forward]:
    """One forward per distinct configuration of ``evaluated``, built once: the tree on the anchor, the tree
    with the preference's BatchNorm shifts (computed here), or the specialised tree with its BatchNorm
    statistics re-estimated on ``calibration`` (training images, needed for ``RECALIBRATED``)."""
    forwards: dict[Hashable, Forward] = {}
    for item in evaluated:
        if item.key in forwards:
            continue
        if item.variant == ADAPTED:
            forwards[item.key] = partial(model.run_tree, architecture=item.architecture,
                                         bn_deltas=model.bn_deltas(item.preference))
        elif item.variant == RECALIBRATED:
            if not calibration:
                raise ValueError("the recalibrated-BatchNorm evaluation needs calibration images: pass "
                                 "recalibrate_batches > 0")
            forwards[item.key] = recalibrate_batchnorm(model.anchor.specialize(item.architecture), calibration)
        else:
            forwards[item.key] = partial(model.anchor, architecture=item.architecture)
    return forwards


class LossSums(Metric):
    """Support-weighted loss sums of several configurations over a stream of batches, a torchmetrics ``Metric``:
    states ``total`` ``(K, N)`` and ``support`` ``(N,)`` float64 and ``samples`` int64, fixed-size whatever the
    number of batches, summed over processes by ``compute`` under DDP (disjoint shards add up to the whole data
    set's).

    Args:
        forwards: configuration key -> forward (``configuration_forwards``).
        tasks: the N tasks whose losses are summed.
    """

    full_state_update = False

    def __init__(self, forwards: Mapping[Hashable, Forward], tasks: Sequence[Task]) -> None:
        super().__init__()
        self.forwards, self.tasks = dict(forwards), list(tasks)
        self.add_state("total", torch.zeros(len(self.forwards), len(self.tasks), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("support", torch.zeros(len(self.tasks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        """Add one batch (already on the sums' device) through every configuration."""
        supports = batch_supports(self.tasks, batch, self.support.device)
        for i, forward in enumerate(self.forwards.values()):
            self.total[i] += batch_loss_sums(forward, batch, self.tasks, supports)
        self.support += supports
        self.samples += batch["image"].shape[0]

    def compute(self) -> tuple[dict[Hashable, Tensor], int]:
        """Unscaled mean losses ``[L_t]`` per configuration key (CPU) and the number of samples, over every
        process."""
        total, support = self.total.cpu(), self.support.cpu()
        return ({key: losses_from_sums(total[i], support, self.tasks) for i, key in enumerate(self.forwards)},
                int(self.samples))


def preference_records(model: DynamicMultiTaskModel, evaluated: Sequence[Evaluated],
                       losses: Mapping[Hashable, Sequence[float]]) -> list[dict[str, Any]]:
    """For each evaluated preference: ``r``, ``c``, its tree, its scaled test-loss vector (``losses`` by
    configuration key) and the tree's cost."""
    return [{"r": list(item.preference.r), "c": item.preference.c, "architecture": item.architecture.to_list(),
             "losses": list(losses[item.key]), **model.node_costs().cost(item.architecture)}
            for item in evaluated]


def front_summary(records: Sequence[dict[str, Any]], reference_point: Sequence[float]) -> dict[str, Any]:
    """Hypervolume (and which algorithm computed it), uniformity and mean cost of a set of records."""
    points = np.array([r["losses"] for r in records], dtype=float)
    method = hypervolume_method(len(points), points.shape[1])
    return {
        "hypervolume": hypervolume(points, np.asarray(reference_point, dtype=float), method=method),
        "hypervolume_method": method,
        "uniformity": mean_uniformity(np.array([r["r"] for r in records]), points),
        "mean_params": float(np.mean([r["params"] for r in records])),
        "mean_gflops": float(np.mean([r["flops"] for r in records])) / 1e9,
    }


def cost_summary(model: DynamicMultiTaskModel, prefs: Sequence[Preference]) -> dict[str, Any]:
    """Mean inference parameters and GFLOPs of the pruned models over ``prefs`` (the protocol uses 1000)."""
    costs = [model.cost(p) for p in prefs]
    return {"count": len(prefs), "mean_params": float(np.mean([c["params"] for c in costs])),
            "mean_gflops": float(np.mean([c["flops"] for c in costs])) / 1e9}


def controllability_grid(model: DynamicMultiTaskModel, cs: Sequence[float] = (0.0, 0.5, 1.0),
                         focus: float = 0.9) -> list[dict[str, Any]]:
    """Parameters of the pruned model for the uniform preference and for each task focused on
    (``r_t = focus``, the rest shared equally), at each ``c``."""
    n = model.n_tasks
    rows: list[tuple[str, Preference | None]] = [("uniform", None)]
    for t, name in enumerate(model.tasks):
        r = [(1.0 - focus) / (n - 1)] * n if n > 1 else [1.0]
        r[t] = focus if n > 1 else 1.0
        rows.append((f"focus {name}", Preference.create(r, 0.0, normalize=True)))
    out = []
    for label, base in rows:
        entry: dict[str, Any] = {"preference": label, "params": {}, "architecture": {}}
        for c in cs:
            pref = Preference.uniform(n, c) if base is None else Preference(base.r, c)
            entry["params"][str(c)] = model.cost(pref)["params"]
            entry["architecture"][str(c)] = str(model.architecture(pref))
        out.append(entry)
    return out
