"""The branching regularizer Omega (docs/method.md, "The regularizer Omega"; 0-based layers: ``nu[k]`` picks
parents in block layer k for the children of layer k + 1; ``nu[L-1]`` holds the heads' choices).

Every function also takes a batch of G preferences' samples (leading dimensions on ``nu``, ``r``, ``c``,
``active``) and returns one value per preference, computed without a Python loop over preferences."""

from __future__ import annotations

import torch
from torch import Tensor


def usage_probabilities(nu: Tensor) -> Tensor:
    """``P_use`` of shape ``(..., L + 1, N)``: row k < L for block layer k, row L (the heads) all ones.

    ``P[k, i] = 1 - prod_j (1 - P[k+1, j] * nu[k, j, i])``, from the heads down.
    """
    n_layers, n = nu.shape[-3], nu.shape[-1]
    rows = [torch.ones((*nu.shape[:-3], n), dtype=nu.dtype, device=nu.device)]
    for k in reversed(range(n_layers)):
        rows.append(1.0 - torch.prod(1.0 - rows[-1].unsqueeze(-1) * nu[..., k, :, :], dim=-2))
    return torch.stack(rows[::-1], dim=-2)


def _pairwise_sq_dist(rows: Tensor) -> Tensor:
    """``||rows[..., i, :] - rows[..., j, :]||^2`` for every pair, ``(..., N, N)``."""
    diff = rows.unsqueeze(-2) - rows.unsqueeze(-3)
    return (diff * diff).sum(dim=-1)


LAYER_WEIGHTINGS = ("paper", "all", "none")


def layer_weights(n_layers: int, weighting: str = "paper") -> list[float]:
    """Weight of the parent choices of block layer ``k`` (0-based; ``k = L-1`` is the heads' choice).

    - ``"paper"``: ``(L - 1 - k) / L``, the paper's ``(L - l) / L`` with ``l = k + 1`` (docs/method.md, "The
      regularizer Omega"): 1 - 1/L near the input down to 0 for the heads' choice;
    - ``"all"``: ``(L - k) / L``, the reading with ``0 <= l < L``: 1 down to 1/L, every decision weighted;
    - ``"none"``: 1 everywhere (the paper's ablation without layer weighting).
    """
    if weighting == "paper":
        return [(n_layers - 1 - k) / n_layers for k in range(n_layers)]
    if weighting == "all":
        return [(n_layers - k) / n_layers for k in range(n_layers)]
    if weighting == "none":
        return [1.0] * n_layers
    raise ValueError(f"layer_weighting must be one of {LAYER_WEIGHTINGS}, got {weighting!r}")


def active_loss(nu: Tensor, usage: Tensor, active: Tensor, affinity: Tensor, weighting: str = "paper") -> Tensor:
    """Pull the parent choices of related active tasks together, more strongly near the input.

    ``sum_k sum_{i != j in A} w_k * Aff[i, j] * P[k+1, i] * P[k+1, j] * ||nu[k, i] - nu[k, j]||^2`` with
    ``w_k = layer_weights(L, weighting)[k]`` (``"paper"``: the paper's ``(L - l) / L`` with ``l = k + 1``;
    docs/method.md, "The regularizer Omega").
    """
    n_layers, n = nu.shape[-3], nu.shape[-1]
    weights = torch.tensor(layer_weights(n_layers, weighting), dtype=nu.dtype, device=nu.device)
    pair = (active.unsqueeze(-1) & active.unsqueeze(-2)) & ~torch.eye(n, dtype=torch.bool, device=nu.device)
    p = usage[..., 1:, :]
    terms = affinity * p.unsqueeze(-1) * p.unsqueeze(-2) * _pairwise_sq_dist(nu)  # (..., L, N, N)
    terms = terms * weights[:, None, None] * pair.unsqueeze(-3).to(nu.dtype)
    return terms.sum(dim=(-3, -2, -1))


def inactive_loss(nu: Tensor, active: Tensor) -> Tensor:
    """Make each inactive task follow its nearest active task: ``sum_k sum_{j in I} min_{i in A} ||nu[k,i]-nu[k,j]||^2``.

    Zero when no task is active or none is inactive.
    """
    dist = _pairwise_sq_dist(nu)  # (..., L, i, j)
    # a distance is at most 2 (rows on the simplex), so 1e9 never wins the min; finite keeps gradients clean
    dist = dist.masked_fill(~active[..., None, :, None], 1e9)
    nearest = dist.min(dim=-2).values  # (..., L, j)
    counted = (~active & active.any(dim=-1, keepdim=True)).unsqueeze(-2)
    return torch.where(counted, nearest, torch.zeros_like(nearest)).sum(dim=(-2, -1))


def omega(nu: Tensor, r: Tensor, c: Tensor | float, affinity: Tensor, tau: float, lambda_active: float,
          lambda_inactive: float, layer_weighting: str = "paper", use_affinity: bool = True,
          task_dichotomy: bool = True, use_inactive: bool = True) -> dict[str, Tensor]:
    """``Omega = c * lambda_A * L_active + lambda_I * L_inactive`` and its terms.

    Args:
        nu: edge samples ``(L, N, N)`` (child, parent), rows on the simplex; or ``(G, L, N, N)`` for G
            preferences.
        r: the task preference ``(N,)`` (or ``(G, N)``).
        c: the cost preference in [0, 1] (or ``(G,)``).
        affinity: task affinity ``(N, N)``.
        tau: tasks with ``r_t >= tau`` are active.
        layer_weighting: see ``layer_weights``.
        use_affinity, task_dichotomy, use_inactive: the paper's ablations (its table 6) when False: every
            affinity 1; every task active (so no inactive term); no inactive term.

    Returns:
        ``omega``, ``active``, ``inactive`` (the unweighted terms; ``()`` or ``(G,)``) and ``usage`` (``P_use``).
    """
    usage = usage_probabilities(nu)
    active = r >= tau if task_dichotomy else torch.ones_like(r, dtype=torch.bool)
    aff = affinity.to(nu) if use_affinity else torch.ones_like(affinity, dtype=nu.dtype)
    l_active = active_loss(nu, usage, active, aff, layer_weighting)
    l_inactive = inactive_loss(nu, active) if use_inactive else torch.zeros_like(l_active)
    total = torch.as_tensor(c, dtype=nu.dtype, device=nu.device) * lambda_active * l_active \
        + lambda_inactive * l_inactive
    return {"omega": total, "active": l_active, "inactive": l_inactive, "usage": usage}
