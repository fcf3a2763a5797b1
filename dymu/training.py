"""The training objectives of the two hypernet stages for one batch, in plain torch.

A batch may carry several preferences: it is split into G contiguous groups, group g trained for its own
``(r_g, c_g)``. In the edge stage the frozen anchor computes every node once for the whole batch and each
sample is routed by its own group's Gumbel sample, so G preferences cost about one. The objective is the
mean over groups of the single-preference objective on the group's samples, so G = 1 is the paper's step
and G groups equal G separate steps on the sub-batches (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dymu.anchor import AnchorNet
from dymu.hypernets import EdgeHypernet, gumbel_samples
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.regularizer import omega
from dymu.tasks import Task, preference_loss, task_losses

Batch = Mapping[str, Tensor]


def group_slices(batch_size: int, groups: int) -> list[slice]:
    """Split ``batch_size`` samples into ``min(groups, batch_size)`` contiguous groups of near-equal size."""
    if groups < 1:
        raise ValueError(f"preference_groups must be >= 1, got {groups}")
    if batch_size < 1:
        raise ValueError("cannot split an empty batch into preference groups")
    groups = min(groups, batch_size)
    bounds = [round(g * batch_size / groups) for g in range(groups + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def batch_slice(batch: Batch, part: slice) -> dict[str, Tensor]:
    return {k: v[part] for k, v in batch.items() if isinstance(v, Tensor)}


def preference_tensors(prefs: Sequence[Preference], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """``r`` as ``(G, N)`` and ``c`` as ``(G,)``."""
    r = torch.stack([p.r_tensor(device=device) for p in prefs])
    c = torch.stack([p.c_tensor(device=device) for p in prefs])
    return r, c


def temperature_at(step: int, total_steps: int, start: float = 5.0, decay: float = 0.97,
                   every: int | None = None) -> float:
    """Gumbel temperature ``start * decay ** (step // every)``.

    ``every=None`` ties the schedule to the step budget: ``every = total_steps / 100`` (at least 1), so a run
    of any length ends where the paper's 30K-step run does (5 * 0.97^100 = 0.24).
    """
    if every is None:
        every = max(1, round(total_steps / 100))
    return start * decay ** (step // every)


def edge_search_loss(anchor: AnchorNet, edge_hypernet: EdgeHypernet, tasks: Sequence[Task], scales: Tensor,
                     batch: Batch, prefs: Sequence[Preference], temperature: float, affinity: Tensor,
                     regularizer: Mapping[str, Any], noise: Tensor | None = None, straight_through: bool = True
                     ) -> dict[str, Tensor]:
    """Stage 2's objective ``mean_g [L_task(r_g) + Omega(r_g, c_g)]`` on a batch split into preference groups.

    Args:
        anchor: the frozen anchor (every node is computed once; each sample follows its group's sample).
        edge_hypernet: ``(r, c) -> log alpha``.
        tasks, scales: the tasks and the loss scales ``w_t`` of ``L_task``.
        batch: images and targets; split into ``len(prefs)`` groups (fewer if the batch is smaller).
        prefs: one preference per group.
        temperature: Gumbel-softmax temperature.
        affinity: task affinity ``(N, N)``.
        regularizer: keyword arguments of ``dymu.regularizer.omega`` except ``nu, r, c, affinity``.
        noise: Gumbel noise ``(G, L, N, N)`` (tests); default: drawn.
        straight_through: the task loss of the hard tree with the soft sample's gradient (as in Learning to
            Branch; docs/method.md, "Edge hypernet and Gumbel-softmax search"); False: the task loss of the
            soft mixture itself (the relaxed Gumbel-softmax objective).

    Returns:
        ``loss``, ``task_loss``, ``omega``, ``active``, ``inactive`` (means over groups) and
        ``expected_used_fraction`` (mean ``P_use`` of the block nodes).
    """
    image = batch["image"]
    parts = group_slices(image.shape[0], len(prefs))
    prefs = list(prefs)[:len(parts)]
    r, c = preference_tensors(prefs, image.device)
    logits = edge_hypernet(r, c)
    hard, soft = gumbel_samples(logits, temperature, noise=None if noise is None else noise[:len(parts)])
    sizes = torch.tensor([p.stop - p.start for p in parts], device=image.device)
    per_sample = torch.repeat_interleave(hard if straight_through else soft, sizes, dim=0)
    outputs = anchor(image, samples=per_sample)
    task_terms = []
    for g, part in enumerate(parts):
        losses = task_losses(list(tasks), batch_slice(outputs, part), batch_slice(batch, part))
        task_terms.append(preference_loss(losses, r[g], scales))
    return search_objective(task_terms, soft, r, c, affinity, regularizer)


def search_objective(task_terms: Sequence[Tensor], soft: Tensor, r: Tensor, c: Tensor, affinity: Tensor,
                     regularizer: Mapping[str, Any]) -> dict[str, Tensor]:
    """``edge_search_loss``'s outputs from the groups' task losses and soft samples: ``Omega`` of every group at
    once, the means over groups, ``expected_used_fraction`` and ``loss = task_loss + omega``."""
    reg = omega(soft, r, c, affinity, **regularizer)
    out = {key: reg[key].mean() for key in ("omega", "active", "inactive")}
    out["expected_used_fraction"] = reg["usage"][:, :-1].mean()
    out["task_loss"] = torch.stack(list(task_terms)).mean()
    out["loss"] = out["task_loss"] + out["omega"]
    return out


def group_index(batch_size: int, groups: int) -> list[int]:
    """Each sample's preference group (``group_slices``'s contiguous groups), as a list of ``batch_size`` ints."""
    return [g for g, part in enumerate(group_slices(batch_size, groups)) for _ in range(part.stop - part.start)]


def captured_edge_loss(anchor: AnchorNet, edge_hypernet: EdgeHypernet, tasks: Sequence[Task], scales: Tensor,
                       batch: Batch, r: Tensor, c: Tensor, temperature: Tensor, affinity: Tensor,
                       regularizer: Mapping[str, Any], noise: Tensor | None = None, straight_through: bool = True
                       ) -> dict[str, Tensor]:
    """``edge_search_loss`` as a function that ``torch.compile`` captures in one graph (``fullgraph=True``; CUDA
    graphs with ``mode="reduce-overhead"``): tensors in, tensors out, static shapes, no ``.item()`` and no
    branch on data.

    What differs from ``edge_search_loss``, which stays the eager step: the preferences come as tensors ``r``
    ``(G, N)`` and ``c`` ``(G,)`` (``preference_tensors``; Preference objects would be guarded as constants and
    recompile every step), the temperature as a 0-d tensor on the batch's device (a float would recompile at
    every change of the schedule), the Gumbel noise is drawn inside when ``noise`` is None (from the global random
    state; a compiled graph draws it with the compiler's generator), every group's task losses are the tasks'
    ``static_loss`` (invalid elements masked, not removed; equal up to rounding), and each sample's group is an
    index computed from the batch size (no ``repeat_interleave`` of a tensor of sizes, whose output size is
    data-dependent). Same arguments and outputs otherwise; equal to ``edge_search_loss`` with the same noise
    (tested, eager and compiled).
    """
    image = batch["image"]
    parts = group_slices(image.shape[0], r.shape[0])
    r, c = r[:len(parts)], c[:len(parts)]
    logits = edge_hypernet(r, c)
    hard, soft = gumbel_samples(logits, temperature, noise=None if noise is None else noise[:len(parts)])
    index = torch.tensor(group_index(image.shape[0], len(parts)), device=image.device)
    outputs = anchor(image, samples=(hard if straight_through else soft).index_select(0, index))
    task_terms = []
    for g, part in enumerate(parts):
        losses = torch.stack([t.static_loss(outputs[t.name][part], batch[t.name][part]) for t in tasks])
        task_terms.append(preference_loss(losses, r[g], scales))
    return search_objective(task_terms, soft, r, c, affinity, regularizer)


def weight_adaptation_loss(model: DynamicMultiTaskModel, tasks: Sequence[Task], scales: Tensor, batch: Batch,
                           prefs: Sequence[Preference]) -> dict[str, Tensor]:
    """Stage 3's objective ``mean_g L_task(r_g)`` of the adapted maximum-likelihood trees, one group per
    preference (each group runs only its own tree's nodes, so G groups cost about one full batch).

    Returns:
        ``loss`` and ``losses`` (the unscaled task losses averaged over groups, for logging).
    """
    parts = group_slices(batch["image"].shape[0], len(prefs))
    terms, per_task = [], []
    for pref, part in zip(prefs, parts):
        sub = batch_slice(batch, part)
        losses = task_losses(list(tasks), model(sub["image"], pref), sub)
        terms.append(preference_loss(losses, pref.r_tensor(device=losses.device), scales))
        per_task.append(losses)
    return {"loss": torch.stack(terms).mean(), "losses": torch.stack(per_task).mean(dim=0)}
