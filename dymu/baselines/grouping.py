"""Task groupings of a tree and their agreement with known groups (Learning to Branch's figure 3).

In a tree of DYMU's search space (``Architecture``) two tasks share block layer ``l`` when their paths pass through
the same node there; since every node has one parent, sharing a node means sharing the whole path below it, so
the grouping of a layer is the partition of the tasks by their node (``tree_groupings``), and groupings can only
split going deeper. LTB's synthetic experiment checks that the tasks made with one activation end in one branch:
``deepest_shared_grouping`` is the grouping of the deepest layer where some tasks still share a node, compared
with the true groups by the adjusted Rand index (``adjusted_rand_index``; Hubert and Arabie, 1985, the definition
``sklearn.metrics.adjusted_rand_score`` implements: 1 for equal partitions, about 0 for a random one).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from math import comb

from dymu.baselines.bmtas import Partition, partition_of
from dymu.search_space import Architecture


def tree_groupings(architecture: Architecture) -> list[Partition]:
    """The task grouping of every block layer, from layer 0 up: tasks grouped by the node their path uses."""
    paths = [architecture.path(t) for t in range(architecture.n_tasks)]
    return [partition_of([path[layer] for path in paths]) for layer in range(architecture.n_layers)]


def deepest_shared_grouping(architecture: Architecture) -> tuple[int | None, Partition]:
    """The deepest block layer where at least two tasks share a node, and its grouping; ``(None, singletons)`` for
    a tree that shares nothing (the anchor)."""
    for layer, grouping in reversed(list(enumerate(tree_groupings(architecture)))):
        if len(grouping) < architecture.n_tasks:
            return layer, grouping
    return None, tuple((t,) for t in range(architecture.n_tasks))


def partition_labels(partition: Sequence[Sequence[int]], n: int | None = None) -> list[int]:
    """One label per element ``0..n-1``: the index of its block in ``partition``.

    Raises:
        ValueError: ``partition`` is not a partition of ``0..n-1`` (``n`` defaults to its size).
    """
    elements = [e for block in partition for e in block]
    n = len(elements) if n is None else n
    if sorted(elements) != list(range(n)):
        raise ValueError(f"{partition} is not a partition of 0..{n - 1}")
    labels = [0] * n
    for index, block in enumerate(partition):
        for element in block:
            labels[element] = index
    return labels


def adjusted_rand_index(labels_true: Sequence[Hashable], labels_pred: Sequence[Hashable]) -> float:
    """The adjusted Rand index of two clusterings of the same elements (one label per element).

    ``(index - expected) / (max - expected)`` with ``index = sum_ij C(n_ij, 2)`` over the contingency table,
    ``expected = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2)`` and ``max = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2``
    (``a``, ``b``: the cluster sizes). When ``max == expected`` (both clusterings all singletons or both one
    cluster) the value is 1, as in scikit-learn.
    """
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"the clusterings label {len(labels_true)} and {len(labels_pred)} elements")
    n = len(labels_true)
    if n == 0:
        raise ValueError("the clusterings are empty")
    pairs: dict[tuple[Hashable, Hashable], int] = {}
    sizes_true: dict[Hashable, int] = {}
    sizes_pred: dict[Hashable, int] = {}
    for a, b in zip(labels_true, labels_pred):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
        sizes_true[a] = sizes_true.get(a, 0) + 1
        sizes_pred[b] = sizes_pred.get(b, 0) + 1
    index = sum(comb(v, 2) for v in pairs.values())
    sum_true = sum(comb(v, 2) for v in sizes_true.values())
    sum_pred = sum(comb(v, 2) for v in sizes_pred.values())
    expected = sum_true * sum_pred / comb(n, 2) if n > 1 else 0.0
    maximum = (sum_true + sum_pred) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))
