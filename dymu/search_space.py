"""The tree-structured search space: an architecture is a parent choice for every child of every layer.

Indexing (0-based, as in docs/method.md; the paper is 1-based): ``parents[k][j]`` is the parent, in block layer ``k``,
of child ``j`` of layer ``k + 1``. Layers ``0..L-1`` are blocks; "layer ``L``" are the heads, so
``parents[L - 1]`` holds the heads' choices. ``parents[k][j] == j`` everywhere is the anchor (N separate
networks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Architecture:
    """Parent choices ``parents[k][j]`` (L rows of N entries each).

    Attributes:
        parents: row ``k`` gives, for each child ``j`` of layer ``k + 1`` (heads for the last row), the
            index of its parent among the N nodes of block layer ``k``.
    """

    parents: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        rows = tuple(tuple(int(p) for p in row) for row in self.parents)
        if not rows or not rows[0]:
            raise ValueError("an architecture needs at least one layer and one task")
        n = len(rows[0])
        for k, row in enumerate(rows):
            if len(row) != n:
                raise ValueError(f"layer {k} has {len(row)} parent choices, expected {n} (one per task)")
            bad = [p for p in row if not 0 <= p < n]
            if bad:
                raise ValueError(f"layer {k} has parent indices {bad} outside 0..{n - 1}")
        object.__setattr__(self, "parents", rows)

    @property
    def n_tasks(self) -> int:
        return len(self.parents[0])

    @property
    def n_layers(self) -> int:
        return len(self.parents)

    @classmethod
    def anchor(cls, n_tasks: int, n_layers: int) -> Architecture:
        """N separate single-task networks."""
        return cls(tuple(tuple(range(n_tasks)) for _ in range(n_layers)))

    @classmethod
    def shared(cls, n_tasks: int, n_layers: int, stream: int = 0) -> Architecture:
        """One backbone (stream ``stream``) shared by all tasks up to the heads."""
        return cls(tuple((stream,) * n_tasks for _ in range(n_layers)))

    @classmethod
    def from_logits(cls, logits: Tensor) -> Architecture:
        """The maximum-likelihood architecture of edge logits of shape ``(L, N, N)`` (child, parent)."""
        if logits.dim() != 3 or logits.shape[1] != logits.shape[2]:
            raise ValueError(f"edge logits must have shape (L, N, N), got {tuple(logits.shape)}")
        return cls(tuple(tuple(row) for row in logits.argmax(dim=-1).tolist()))

    @classmethod
    def random(cls, n_tasks: int, n_layers: int, generator: torch.Generator | None = None) -> Architecture:
        choices = torch.randint(0, n_tasks, (n_layers, n_tasks), generator=generator)
        return cls(tuple(tuple(row) for row in choices.tolist()))

    def used_nodes(self) -> list[frozenset[int]]:
        """Used nodes of every block layer: ``U_{L-1}`` = parents of the heads, ``U_k`` = parents of ``U_{k+1}``."""
        used: list[frozenset[int]] = [frozenset()] * self.n_layers
        children = range(self.n_tasks)
        for k in reversed(range(self.n_layers)):
            used[k] = frozenset(self.parents[k][j] for j in children)
            children = sorted(used[k])
        return used

    def num_used_nodes(self) -> int:
        return sum(len(u) for u in self.used_nodes())

    def path(self, task: int) -> list[int]:
        """Stream index of the node used by ``task`` in every block layer, from layer 0 up."""
        nodes, child = [], task
        for k in reversed(range(self.n_layers)):
            child = self.parents[k][child]
            nodes.append(child)
        return nodes[::-1]

    def one_hot(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The architecture as hard samples ``(L, N, N)``: ``[k, j, i] = 1`` iff ``parents[k][j] == i``."""
        return torch.nn.functional.one_hot(torch.tensor(self.parents), self.n_tasks).to(dtype)

    def to_list(self) -> list[list[int]]:
        return [list(row) for row in self.parents]

    def __str__(self) -> str:
        return " | ".join(",".join(str(p) for p in row) for row in self.parents)


def as_architecture(value: Architecture | Sequence[Sequence[int]]) -> Architecture:
    """Accept an ``Architecture`` or nested parent lists."""
    return value if isinstance(value, Architecture) else Architecture(tuple(tuple(r) for r in value))
