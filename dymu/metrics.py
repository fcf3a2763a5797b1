"""Evaluation metrics of the protocol (docs/method.md, "Evaluation protocol"): hypervolume, uniformity, Delta_m.

Inputs may be sequences, numpy arrays or torch tensors; they are converted to float64 numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import moocore
import numpy as np
import torch
from pymoo.indicators.hv import HV
from torch import Tensor

HV_METHODS = ("auto", "exact", "approx")
"""Accepted values of the ``method`` argument of :func:`hypervolume`."""

# ``"auto"`` approximates the hypervolume when there are at least APPROX_MIN_OBJECTIVES objectives and
# more than EXACT_MAX_POINTS points. Measured on 2 CPU cores with pymoo 0.6.2 (moocore 0.3.2), exact
# hypervolume of 20 points takes 0.1 ms in 5-D, 5 ms in 10-D, 1 s in 15-D and 45-70 s in 20-D; 40 points
# take 0.3 s in 10-D, 100 points 110 s in 10-D, and 40 points in 15-D more than 3 minutes.
APPROX_MIN_OBJECTIVES = 10
EXACT_MAX_POINTS = 20


def _as_array(value: Any, name: str) -> np.ndarray:
    """Converts a sequence, numpy array or torch tensor to a float64 numpy array.

    Raises:
        ValueError: if the values are not real numbers or not all finite.
    """
    if isinstance(value, Tensor):
        value = value.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be an array of real numbers (got {value!r})") from err
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (got {arr.tolist()}, which holds NaN or inf)")
    return arr


def hypervolume_method(n_points: int, n_obj: int, method: str = "auto") -> str:
    """Says which algorithm :func:`hypervolume` uses, so that reports can name it.

    Args:
        n_points: number of points P given to :func:`hypervolume` (before removing points outside the
            reference box).
        n_obj: number of objectives M.
        method: ``"exact"``, ``"approx"`` or ``"auto"`` (exact unless ``M >= 10`` and ``P > 20``).

    Returns:
        ``"exact"`` or ``"approx"``.

    Raises:
        ValueError: if ``method`` is not one of ``HV_METHODS``.
    """
    if method not in HV_METHODS:
        raise ValueError(f"hypervolume method must be one of {HV_METHODS} (got {method!r})")
    if method != "auto":
        return method
    if n_obj >= APPROX_MIN_OBJECTIVES and n_points > EXACT_MAX_POINTS:
        return "approx"
    return "exact"


def hypervolume(points: Any, ref_point: Any, method: str = "auto") -> float:
    """Hypervolume dominated by a set of loss vectors (minimisation) and bounded by a reference point.

    Points that are not strictly below the reference point in every objective span no volume inside the
    reference box and are dropped. ``"exact"`` uses ``pymoo.indicators.hv.HV``; ``"approx"`` uses
    ``moocore.hv_approx`` with its default deterministic method (``"Rphi-FWE+"``, 2^18 directions);
    ``"auto"`` picks as :func:`hypervolume_method` says.

    Args:
        points: (P, M) loss vectors.
        ref_point: (M,) reference point.
        method: ``"auto"``, ``"exact"`` or ``"approx"``.

    Returns:
        The hypervolume (0.0 when no point lies inside the reference box).

    Raises:
        ValueError: on a bad shape, a non-finite value or an unknown method.
    """
    pts = _as_array(points, "points")
    ref = _as_array(ref_point, "ref_point")
    if pts.ndim != 2:
        raise ValueError(f"points must have shape (P, M) (got {tuple(pts.shape)}); pass one row per point")
    if ref.ndim != 1 or ref.shape[0] != pts.shape[1]:
        raise ValueError(
            f"ref_point must have shape ({pts.shape[1]},) to match points of shape {tuple(pts.shape)} "
            f"(got {tuple(ref.shape)})"
        )
    chosen = hypervolume_method(pts.shape[0], pts.shape[1], method)
    inside = pts[np.all(pts < ref, axis=1)]
    if inside.shape[0] == 0:
        return 0.0
    if chosen == "exact":
        return float(HV(ref_point=ref)(inside))
    return float(moocore.hv_approx(inside, ref=ref))


def _kl_to_uniform(p: np.ndarray) -> float:
    """KL(p || 1/N) = sum_j p_j log(N p_j), with 0 log 0 = 0."""
    positive = p[p > 0]
    return float(np.sum(positive * np.log(positive * p.shape[0])))


def _check_same_shape(r: np.ndarray, losses: np.ndarray) -> None:
    """Raises ValueError unless ``r`` and ``losses`` have the same shape."""
    if r.shape != losses.shape:
        raise ValueError(
            f"r and losses must have the same shape (got {tuple(r.shape)} and {tuple(losses.shape)})"
        )


def uniformity(r: Any, losses: Any) -> float:
    """Uniformity ``mu_r = 1 - KL(Lhat || 1/N)``, ``Lhat_j = r_j L_j / sum_i r_i L_i``.

    It is 1 when the weighted losses ``r_j L_j`` are all equal and ``1 - log(N)`` (natural log) when one
    task carries all of them.

    Args:
        r: (N,) task weights, non-negative.
        losses: (N,) task losses, non-negative.

    Returns:
        The uniformity.

    Raises:
        ValueError: on a bad shape, a negative or non-finite value, or ``sum_i r_i L_i == 0``.
    """
    r_arr = _as_array(r, "r")
    loss_arr = _as_array(losses, "losses")
    if r_arr.ndim != 1 or r_arr.size == 0:
        raise ValueError(f"r must have shape (N,) with N >= 1 (got {tuple(r_arr.shape)})")
    _check_same_shape(r_arr, loss_arr)
    if np.any(r_arr < 0):
        raise ValueError(f"r must be non-negative (got {r_arr.tolist()})")
    if np.any(loss_arr < 0):
        raise ValueError(f"losses must be non-negative (got {loss_arr.tolist()})")
    weighted = r_arr * loss_arr
    total = float(weighted.sum())
    if total <= 0:
        raise ValueError(
            f"uniformity needs sum_i r_i L_i > 0 (got r = {r_arr.tolist()}, losses = {loss_arr.tolist()})"
        )
    return 1.0 - _kl_to_uniform(weighted / total)


def mean_uniformity(rs: Any, losses: Any) -> float:
    """Mean of :func:`uniformity` over a set of preferences and their loss vectors.

    Args:
        rs: (P, N) task weights, one row per preference.
        losses: (P, N) loss vectors, row ``k`` obtained for ``rs[k]``.

    Returns:
        The mean uniformity.

    Raises:
        ValueError: on a bad shape or an invalid row (see :func:`uniformity`).
    """
    r_arr = _as_array(rs, "rs")
    loss_arr = _as_array(losses, "losses")
    if r_arr.ndim != 2 or r_arr.shape[0] == 0 or r_arr.shape[1] == 0:
        raise ValueError(f"rs must have shape (P, N) with P, N >= 1 (got {tuple(r_arr.shape)})")
    _check_same_shape(r_arr, loss_arr)
    return float(np.mean([uniformity(r, loss) for r, loss in zip(r_arr, loss_arr)]))


def delta_m(metrics: Sequence[float], single_task: Sequence[float], lower_is_better: Sequence[bool]) -> float:
    """Multi-task performance ``Delta_m = (1/N) sum_t (-1)^{l_t} (M_t - M_single,t) / M_single,t``.

    ``l_t = 1`` where lower is better, so a positive value means better than the single-task networks on
    average. The value is a fraction: multiply by 100 to report it in %.

    Args:
        metrics: (N,) the multi-task model's metric per task.
        single_task: (N,) the single-task networks' metric per task, non-zero.
        lower_is_better: (N,) whether a lower metric is better, per task.

    Returns:
        Delta_m as a fraction.

    Raises:
        ValueError: on mismatched lengths, an empty input, a non-finite metric or a zero single-task metric.
    """
    m = _as_array(metrics, "metrics")
    s = _as_array(single_task, "single_task")
    lower = np.asarray(lower_is_better, dtype=bool)
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"metrics must have shape (N,) with N >= 1 (got {tuple(m.shape)})")
    if s.shape != m.shape or lower.shape != m.shape:
        raise ValueError(
            f"metrics, single_task and lower_is_better must have the same length (got {m.size}, "
            f"{s.size} and {lower.size})"
        )
    if np.any(s == 0):
        raise ValueError(f"single_task metrics must be non-zero to divide by them (got {s.tolist()})")
    sign = np.where(lower, -1.0, 1.0)
    return float(np.mean(sign * (m - s) / s))
