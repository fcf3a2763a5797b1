"""The evaluation protocol of METHOD.md in plain torch: loss vectors per preference, hypervolume,
uniformity, and the inference cost over many preferences."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dymu.anchor import recalibrate_batchnorm
from dymu.metrics import hypervolume, hypervolume_method, mean_uniformity
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.search_space import Architecture
from dymu.tasks import Task, task_losses, task_scales

Batch = dict[str, Tensor]


@torch.no_grad()
def task_loss_sums(forward: Callable[[Tensor], dict[str, Tensor]], batches: Iterable[Batch],
                   tasks: Sequence[Task], device: torch.device | str = "cpu", allow_empty: bool = False
                   ) -> tuple[Tensor, Tensor]:
    """Support-weighted sums of the unscaled batch losses and the supports (``Task.support``: the valid
    pixels or labelled samples each batch loss averages over), float64 ``(N,)`` each; sums from several
    processes add up to the whole data set's (one process's shard may be empty with ``allow_empty``)."""
    tasks = list(tasks)
    total = torch.zeros(len(tasks), dtype=torch.float64)
    support = torch.zeros(len(tasks), dtype=torch.float64)
    num_batches = 0
    for batch in batches:
        num_batches += 1
        batch = {k: v.to(device) for k, v in batch.items()}
        counts = torch.tensor([float(t.support(batch[t.name])) for t in tasks], dtype=torch.float64)
        losses = task_losses(tasks, forward(batch["image"]), batch).double().cpu()
        total += torch.where(counts > 0, losses * counts, 0.0)  # a loss over no valid target is undefined
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


def mean_task_losses(forward: Callable[[Tensor], dict[str, Tensor]], batches: Iterable[Batch],
                     tasks: Sequence[Task], device: torch.device | str = "cpu") -> Tensor:
    """Unscaled losses ``[L_t]`` over a data set: each batch loss weighted by its support, so the result is
    the data set's own mean."""
    return losses_from_sums(*task_loss_sums(forward, batches, tasks, device), tasks)


def scaled(losses: Tensor, tasks: Sequence[Task]) -> list[float]:
    """The loss vector of METHOD.md's protocol: ``[w_t * L_t]``."""
    return (losses * task_scales(list(tasks))).tolist()


def preference_records(model: DynamicMultiTaskModel, prefs: Sequence[Preference], batches: Sequence[Batch],
                       tasks: Sequence[Task], adapt: bool, device: torch.device | str = "cpu",
                       recalibrate: Sequence[Tensor] | None = None) -> list[dict[str, Any]]:
    """For each preference: its tree, cost and scaled test-loss vector. Without adaptation the losses
    depend only on the tree, so each distinct tree is evaluated once. With ``recalibrate`` (training
    images; no adaptation) each tree is specialised and its BatchNorm statistics re-estimated on them."""
    cache: dict[Architecture, list[float]] = {}
    calibration = None if recalibrate is None else [x.to(device) for x in recalibrate]
    records = []
    for pref in tqdm(prefs, desc=f"evaluate (c={prefs[0].c:g}, adaptation={adapt})", leave=False):
        arch = model.architecture(pref)
        if calibration is not None:
            if arch not in cache:
                tree = recalibrate_batchnorm(model.anchor.specialize(arch), calibration)
                cache[arch] = scaled(mean_task_losses(tree, batches, tasks, device), tasks)
            losses = cache[arch]
        elif adapt and model.weight_hypernet is not None:
            deltas = model.bn_deltas(pref)
            losses = scaled(mean_task_losses(
                lambda x, a=arch, d=deltas: model.run_tree(x, a, d), batches, tasks,
                device), tasks)
        else:
            if arch not in cache:
                cache[arch] = scaled(mean_task_losses(
                    lambda x, a=arch: model.anchor(x, architecture=a), batches, tasks, device), tasks)
            losses = cache[arch]
        records.append({"r": list(pref.r), "c": pref.c, "architecture": arch.to_list(),
                        "losses": losses, **model.node_costs().cost(arch)})
    return records


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
