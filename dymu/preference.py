"""Preferences ``(r, c)``, their samplers and their learnable embedding (docs/method.md, "Preferences").

A preference is a task weighting ``r`` on the probability simplex (N entries >= 0 that sum to 1) and a
compute budget ``c`` in [0, 1], where a larger ``c`` asks for a more frugal architecture.

Samplers:

- :func:`sample_training_preference`: the training distribution, ``r ~ Dirichlet(0.2 * 1_N)``,
  ``c ~ Uniform(0, 1)``, one preference per batch.
- :func:`evaluation_preferences`: the protocol's fixed-seed set, ``r ~ Dirichlet(1_N)`` at one given ``c``.
- :func:`cost_preferences`: the fixed-seed set over which inference parameters and FLOPs are averaged,
  ``r ~ Dirichlet(1_N)``, ``c ~ Uniform(0, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

SUM_TOLERANCE = 1e-6
"""Largest allowed ``|sum(r) - 1|`` for a preference that is not rescaled."""

TRAINING_ETA = 0.2
"""Dirichlet concentration of the training preference distribution (docs/method.md, "Preferences")."""


def _as_array(value: Any) -> np.ndarray:
    """Converts a sequence, numpy array or torch tensor to a float64 numpy array (no validation)."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool:
            raise ValueError(f"preference values must be numbers, not booleans (got {value.tolist()!r})")
        value = value.detach().cpu().to(torch.float64).numpy()
    try:
        kind = np.asarray(value).dtype.kind
    except (TypeError, ValueError):
        kind = "O"
    if kind in "USb":
        raise ValueError(f"preference values must be real numbers (got {value!r}); pass floats, e.g. [0.5, 0.5] and 0.5")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"preference values must be real numbers (got {value!r}); pass a sequence of floats"
        ) from err


def _checked_r(r: Any) -> np.ndarray:
    """Validates everything about ``r`` except its sum.

    Args:
        r: the task weights as a sequence, numpy array or torch tensor.

    Returns:
        ``r`` as a 1-D float64 numpy array.

    Raises:
        ValueError: if ``r`` is not 1-D, is empty, has a NaN or infinite entry or a negative entry.
    """
    arr = _as_array(r)
    if arr.ndim != 1:
        raise ValueError(
            f"preference r must be 1-D (got shape {tuple(arr.shape)}); pass one weight per task as a flat "
            "sequence"
        )
    if arr.size == 0:
        raise ValueError("preference r must not be empty (got 0 entries); pass one weight per task")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"preference r must be finite (got {arr.tolist()}, which holds NaN or inf); "
            "pass finite non-negative weights"
        )
    if np.any(arr < 0):
        bad = int(np.argmin(arr))
        raise ValueError(
            f"preference r must be non-negative (got r[{bad}] = {arr[bad]} in {arr.tolist()}); "
            "pass weights >= 0"
        )
    return arr


def _checked_c(c: Any) -> float:
    """Validates the budget ``c`` and returns it as a float.

    Raises:
        ValueError: if ``c`` is not a finite scalar in [0, 1].
    """
    if isinstance(c, (str, bytes, bool, np.bool_)) or (isinstance(c, Tensor) and c.dtype == torch.bool):
        raise ValueError(f"preference c must be a number in [0, 1] (got {c!r} of type {type(c).__name__}); "
                         "pass a float such as 0.5")
    arr = _as_array(c)
    if arr.ndim != 0:
        raise ValueError(f"preference c must be a scalar (got shape {tuple(arr.shape)}); pass one float")
    value = float(arr)
    if not math.isfinite(value):
        raise ValueError(f"preference c must be finite (got {value}); pass a budget in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"preference c must lie in [0, 1] (got {value}); pass a budget in [0, 1]")
    return value


@dataclass(frozen=True)
class Preference:
    """A task preference ``r`` (on the simplex) and compute budget ``c`` (in [0, 1]).

    ``r`` may be given as any sequence, numpy array or torch tensor; it is stored as a tuple of floats
    and ``c`` as a float, so preferences are hashable and compare by value.

    Attributes:
        r: task weights, N entries >= 0 that sum to 1 within ``SUM_TOLERANCE``.
        c: compute budget in [0, 1]; larger is more frugal.

    Raises:
        ValueError: on construction, if ``r`` is not a 1-D non-empty finite non-negative vector summing
            to 1, or ``c`` is not a finite scalar in [0, 1]. The message names the problem, the
            offending value and the fix.
    """

    r: tuple[float, ...]
    c: float

    def __post_init__(self) -> None:
        arr = _checked_r(self.r)
        total = float(arr.sum())
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise ValueError(f"preference r must sum to 1 (got {total}); pass normalize=True to rescale it")
        object.__setattr__(self, "r", tuple(float(x) for x in arr))
        object.__setattr__(self, "c", _checked_c(self.c))

    @classmethod
    def create(cls, r: Any, c: Any, normalize: bool = False, n_tasks: int | None = None) -> Preference:
        """Builds a validated preference.

        Args:
            r: task weights (sequence, numpy array or torch tensor).
            c: compute budget in [0, 1].
            normalize: divide ``r`` by its sum instead of requiring that it sums to 1; ``r`` must still be
                finite and non-negative with a positive sum.
            n_tasks: if given, the number of tasks of the model the preference is for.

        Returns:
            The preference.

        Raises:
            ValueError: if the values are invalid (see the class) or ``r`` does not have ``n_tasks``
                entries.
        """
        if normalize:
            arr = _checked_r(r)
            total = float(arr.sum())
            if total <= 0.0:
                raise ValueError(
                    f"preference r must have a positive sum to be normalized (got {arr.tolist()}); "
                    "give at least one task a positive weight"
                )
            r = arr / total
        pref = cls(r, c)
        if n_tasks is not None:
            pref.check_n_tasks(n_tasks)
        return pref

    @classmethod
    def uniform(cls, n: int, c: float = 0.0) -> Preference:
        """The preference that weights all ``n`` tasks equally, ``r = 1/n * 1_n``.

        Raises:
            ValueError: if ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"a uniform preference needs n >= 1 tasks (got {n})")
        return cls((1.0 / n,) * n, c)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preference:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: if a key is missing or the values are invalid.
        """
        missing = [key for key in ("r", "c") if key not in data]
        if missing:
            raise ValueError(
                f"preference dict is missing {missing} (got keys {sorted(data)}); "
                "it needs 'r' (list of floats) and 'c' (float)"
            )
        return cls(data["r"], data["c"])

    @property
    def n_tasks(self) -> int:
        """Number of tasks N (entries of ``r``)."""
        return len(self.r)

    def check_n_tasks(self, n_tasks: int) -> None:
        """Raises ValueError unless the preference has exactly ``n_tasks`` entries."""
        if self.n_tasks != n_tasks:
            raise ValueError(
                f"preference has {self.n_tasks} entries but the model has {n_tasks} tasks "
                f"(r = {list(self.r)}); pass one weight per task"
            )

    def r_tensor(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``r`` as a tensor of shape (N,)."""
        return torch.tensor(self.r, dtype=dtype, device=device)

    def c_tensor(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """``c`` as a 0-d tensor."""
        return torch.tensor(self.c, dtype=dtype, device=device)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict ``{"r": [...], "c": float}``."""
        return {"r": list(self.r), "c": self.c}


def _check_count(name: str, value: int, minimum: int) -> None:
    """Raises ValueError unless the integer argument ``name`` is at least ``minimum``."""
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (got {value})")


def sample_training_preference(
    n_tasks: int, rng: np.random.Generator, eta: float = TRAINING_ETA
) -> Preference:
    """Draws one training preference: ``r ~ Dirichlet(eta * 1_N)``, ``c ~ Uniform(0, 1)``.

    With a small ``eta`` most draws put almost all mass on one or two tasks; entries can underflow to
    exactly 0 and the sum can be off by rounding, so ``r`` is divided by its sum before validation.

    Args:
        n_tasks: number of tasks N.
        rng: the random generator (the caller owns the seed).
        eta: Dirichlet concentration, > 0.

    Returns:
        The preference.

    Raises:
        ValueError: if ``n_tasks < 1`` or ``eta <= 0``.
    """
    _check_count("n_tasks", n_tasks, 1)
    if not eta > 0:
        raise ValueError(f"eta must be > 0 (got {eta})")
    r = rng.dirichlet(np.full(n_tasks, eta))
    c = rng.uniform(0.0, 1.0)
    return Preference.create(r, c, normalize=True)


def evaluation_preferences(
    n_tasks: int, count: int = 20, c: float = 0.0, seed: int = 0, alpha: float = 1.0
) -> list[Preference]:
    """The protocol's evaluation preferences: ``count`` draws ``r ~ Dirichlet(alpha * 1_N)`` at budget ``c``.

    The same ``seed`` gives the same ``r`` for every ``c``, so the sets for ``c = 0`` and ``c = 1`` differ
    only in the budget.

    Args:
        n_tasks: number of tasks N.
        count: number of preferences (the protocol uses 20).
        c: the budget shared by all of them (the protocol uses 0 and 1).
        seed: seed of the generator.
        alpha: Dirichlet concentration, > 0.

    Returns:
        The preferences, in draw order.

    Raises:
        ValueError: if ``n_tasks < 1``, ``count < 1``, ``alpha <= 0`` or ``c`` is not in [0, 1].
    """
    _check_count("n_tasks", n_tasks, 1)
    _check_count("count", count, 1)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (got {alpha})")
    rng = np.random.default_rng(seed)
    rs = rng.dirichlet(np.full(n_tasks, alpha), size=count)
    return [Preference.create(r, c, normalize=True) for r in rs]


def cost_preferences(n_tasks: int, count: int = 1000, seed: int = 0) -> list[Preference]:
    """Preferences for averaging inference cost: ``r ~ Dirichlet(1_N)``, ``c ~ Uniform(0, 1)``.

    Args:
        n_tasks: number of tasks N.
        count: number of preferences (the protocol uses 1000).
        seed: seed of the generator.

    Returns:
        The preferences, in draw order.

    Raises:
        ValueError: if ``n_tasks < 1`` or ``count < 1``.
    """
    _check_count("n_tasks", n_tasks, 1)
    _check_count("count", count, 1)
    rng = np.random.default_rng(seed)
    rs = rng.dirichlet(np.ones(n_tasks), size=count)
    cs = rng.uniform(0.0, 1.0, size=count)
    return [Preference.create(r, c, normalize=True) for r, c in zip(rs, cs)]


class PreferenceEmbedding(nn.Module):
    """Learnable embedding ``p = sum_t r_t e_t + c e_c`` of a preference.

    The task embeddings ``e_t`` and the cost embedding ``e_c`` are initialised from
    ``Normal(0, 1 / dim)`` (standard deviation ``1 / sqrt(dim)``), so that an embedding has norm about 1.

    Args:
        n_tasks: number of tasks N.
        dim: embedding size (32 in the paper).

    Attributes:
        task_embeddings: (N, dim) parameter, row ``t`` is ``e_t``.
        cost_embedding: (dim,) parameter ``e_c``.
    """

    def __init__(self, n_tasks: int, dim: int = 32) -> None:
        super().__init__()
        _check_count("n_tasks", n_tasks, 1)
        _check_count("dim", dim, 1)
        self.n_tasks = n_tasks
        self.dim = dim
        std = 1.0 / math.sqrt(dim)
        self.task_embeddings = nn.Parameter(torch.randn(n_tasks, dim) * std)
        self.cost_embedding = nn.Parameter(torch.randn(dim) * std)

    def forward(self, r: Tensor, c: Tensor) -> Tensor:
        """Embeds a preference (or a batch of them).

        Args:
            r: task weights, shape (N,) or (B, N).
            c: budget, a scalar tensor, or shape (B,) for a batch.

        Returns:
            The embedding, shape (dim,) or (B, dim).

        Raises:
            ValueError: if the shapes do not match the number of tasks or each other.
        """
        if r.ndim not in (1, 2) or r.shape[-1] != self.n_tasks:
            raise ValueError(
                f"r must have shape ({self.n_tasks},) or (B, {self.n_tasks}) (got {tuple(r.shape)}); "
                f"the embedding was built for {self.n_tasks} tasks"
            )
        if c.shape != r.shape[:-1]:
            raise ValueError(
                f"c must have shape {tuple(r.shape[:-1])} to match r of shape {tuple(r.shape)} "
                f"(got {tuple(c.shape)})"
            )
        weight = self.task_embeddings
        r = r.to(weight.dtype)
        c = c.to(weight.dtype)
        return r @ weight + c.unsqueeze(-1) * self.cost_embedding
