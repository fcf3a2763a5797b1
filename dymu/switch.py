"""Switching preferences fast: specialised networks cached by architecture.

``DynamicMultiTaskModel.specialize(r, c)`` runs the hypernets and copies the tree's nodes (a deep copy,
milliseconds to a second for the paper's networks). Many preferences share a tree, so the copy is kept per
tree and a switch to a preference whose tree was seen only runs the hypernets and writes the weight
hypernet's BatchNorm shifts into the kept copy (``AnchorNet.bake_bn_deltas``): the same module as
``specialize`` would return, at a fraction of the cost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from dymu.anchor import BatchNormCopies, SpecializedNet
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.search_space import Architecture


class SpecializationCache:
    """``cache(r, c)`` equals ``model.specialize(r, c)`` (same outputs, bit for bit), built once per tree.

    The returned module is the cache's own: the next switch to a preference with the same tree rewrites its
    BatchNorm affine parameters (copy it to keep one). The model's weights must not change while the cache is
    in use (``clear()`` after they do).

    Args:
        model: the controllable model.
        max_trees: how many specialised trees to keep (least recently used dropped first); None: all.
    """

    def __init__(self, model: DynamicMultiTaskModel, max_trees: int | None = None) -> None:
        if max_trees is not None and max_trees < 1:
            raise ValueError(f"max_trees must be >= 1 or None, got {max_trees}")
        self.model, self.max_trees = model, max_trees
        self._trees: OrderedDict[tuple[Architecture, str], tuple[SpecializedNet, BatchNormCopies]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._trees)

    def clear(self) -> None:
        self._trees.clear()

    @torch.no_grad()
    def __call__(self, r: Sequence[float] | Tensor | Preference, c: float | None = None) -> SpecializedNet:
        model = self.model
        pref = model.preference(r, c)
        arch = model.architecture(pref)
        deltas = model.bn_deltas(pref)
        statistics = model.bn_statistics if deltas is not None else "running"
        key = (arch, statistics)
        entry = self._trees.get(key)
        if entry is None:
            self.misses += 1
            net = model.anchor.specialize(arch, bn_statistics=statistics)
            entry = (net, model.anchor.batchnorm_copies(net.blocks))
            self._trees[key] = entry
            if self.max_trees is not None and len(self._trees) > self.max_trees:
                self._trees.popitem(last=False)
        else:
            self.hits += 1
            self._trees.move_to_end(key)
        net, copies = entry
        if deltas is not None:
            model.anchor.bake_bn_deltas(net.blocks, deltas, copies)
        if net.training != model.anchor.training:
            net.train(model.anchor.training)
        return net
