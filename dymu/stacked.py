"""Streams as one: the nodes of one layer that share a structure run as one batched call.

The anchor's N streams hold N copies of the same block per layer. Rather than N calls, their parameters and
buffers are stacked along a new leading dimension and one ``torch.vmap`` of ``torch.func.functional_call``
computes all of them (convolutions become one grouped convolution, BatchNorms one call over all streams).
Features then stay stacked as ``(S, B, ...)`` from layer to layer, and the edge stage's mixing of parent
paths is one ``einsum`` on the stacked features (``mix_stacked``).

The stacked parameters are ``torch.stack`` of the streams' own parameters, so gradients reach them. In
training mode BatchNorm updates the running statistics of the stacked buffers (one slice per stream, as a
BatchNorm with batched running statistics does under ``vmap``); they are copied back into each stream's
own buffers after the call. Dropout draws each stream's own mask (``randomness="different"``): the same
distribution as the per-node path, not the same numbers.

Used by ``dymu.anchor.AnchorNet`` (``stacked=True``) for the anchor's N independent streams and the edge
stage's sampled forward; trees and specialised models keep the per-node path. Nothing here imports
``dymu.anchor``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call


class Streams(Protocol):
    """What the stacked forwards need of an anchor (``dymu.anchor.AnchorNet``)."""

    heads: nn.ModuleList

    @property
    def n_tasks(self) -> int: ...

    @property
    def n_layers(self) -> int: ...

    def node(self, layer: int, stream: int) -> nn.Module: ...


def mix_stacked(stacked: Tensor, weights: Tensor) -> Tensor:
    """Child ``j`` = ``sum_i weights[j, i] * stacked[i]`` for ``stacked`` of shape ``(N, B, ...)``.

    ``weights`` is ``(N, N)`` (one mix for the whole batch) or ``(B, N, N)`` (one mix per sample).
    Returns ``(N_children, B, ...)``.
    """
    if weights.ndim == 2:
        return torch.einsum("ji,i...->j...", weights.to(stacked.dtype), stacked)
    return torch.einsum("bji,ib...->jb...", weights.to(stacked.dtype), stacked)


def _structure(module: nn.Module) -> tuple[Any, ...]:
    """What must agree for modules to share one stacked call: the module tree (its ``repr`` names every
    layer's hyperparameters) and the names, shapes and dtypes of its parameters and buffers."""
    tensors = [(name, None if t is None else (tuple(t.shape), t.dtype))
               for name, t in [*module.named_parameters(), *module.named_buffers()]]
    return (repr(module), tuple(tensors))


def stack_groups(modules: Sequence[nn.Module]) -> list[list[int]]:
    """Indices of ``modules`` grouped by structure (``_structure``), each group in index order, groups in
    order of their first member."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(modules):
        groups.setdefault(_structure(m), []).append(i)
    return list(groups.values())


def _batch_norm_momentum_ok(module: nn.Module) -> bool:
    """A training-mode BatchNorm with ``momentum=None`` (a cumulative average) reads its batch counter as a
    Python number, which ``vmap`` cannot: such modules run per node."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.momentum is None
                   and m.track_running_stats for m in module.modules())


def stackable(modules: Sequence[nn.Module]) -> bool:
    """Whether a group of one structure (``stack_groups``) runs as one stacked call: more than one module and
    no training-mode cumulative BatchNorm."""
    return len(modules) > 1 and all(_batch_norm_momentum_ok(m) for m in modules)


def stacked_call(modules: Sequence[nn.Module], inputs: Any, in_dims: Any = 0) -> Any:
    """``[modules[s](inputs[s]) for s]`` as one ``vmap`` call, outputs stacked along dim 0.

    Args:
        modules: modules of one structure (``stack_groups``).
        inputs: the single argument of every module (a tensor or a pytree such as a path).
        in_dims: ``vmap``'s ``in_dims`` for ``inputs``: 0 where the input is stacked per module, ``None``
            where all modules share it.

    In training mode the updated BatchNorm statistics (and every other buffer) are written back to each
    module's own buffers.
    """
    first = modules[0]
    names = [n for n, _ in first.named_parameters()]
    per_module = [dict(m.named_parameters()) for m in modules]
    params = {n: torch.stack([p[n] for p in per_module]) for n in names}
    buffer_lists = [dict(m.named_buffers()) for m in modules]
    buffer_names = [n for n, b in first.named_buffers() if b is not None]
    buffers = {n: torch.stack([b[n] for b in buffer_lists]) for n in buffer_names}

    def call(p: dict[str, Tensor], b: dict[str, Tensor], x: Any) -> Any:
        return functional_call(first, {**p, **b}, (x,))

    out = torch.vmap(call, in_dims=(0, 0, in_dims), randomness="different")(params, buffers, inputs)
    if first.training and buffers:
        with torch.no_grad():
            for n, stacked in buffers.items():
                for s, b in enumerate(buffer_lists):
                    b[n].copy_(stacked[s])
    return out


class StackedLayer:
    """The outputs of one layer's N nodes: per stream, and as one ``(N, B, ...)`` tensor when one stacked
    call made them all (so the next layer takes them without copying)."""

    def __init__(self, outputs: list[Tensor], stacked: Tensor | None = None) -> None:
        self.outputs, self.stacked = outputs, stacked

    def gather(self, idx: Sequence[int]) -> Tensor:
        """The outputs of streams ``idx`` stacked along dim 0."""
        if self.stacked is not None:
            return self.stacked if list(idx) == list(range(len(self.outputs))) else self.stacked[list(idx)]
        return torch.stack([self.outputs[i] for i in idx])


def run_layer(modules: Sequence[nn.Module], groups: Sequence[Sequence[int]],
              inputs: StackedLayer | Tensor) -> StackedLayer:
    """Node ``s`` of a layer on its input (``inputs.outputs[s]``, or the shared tensor ``inputs``), each group of
    ``groups`` as one stacked call (a group of one, or a group that cannot stack, per node)."""
    outputs: list[Tensor | None] = [None] * len(modules)
    whole: Tensor | None = None
    for idx in groups:
        members = [modules[i] for i in idx]
        if not stackable(members):
            for i in idx:
                outputs[i] = modules[i](inputs if isinstance(inputs, Tensor) else inputs.outputs[i])
            continue
        if isinstance(inputs, Tensor):
            y = stacked_call(members, inputs, in_dims=None)
        else:
            y = stacked_call(members, inputs.gather(idx), in_dims=0)
        if len(idx) == len(modules):
            whole = y
        for i, yi in zip(idx, y.unbind(0)):
            outputs[i] = yi
    return StackedLayer([o for o in outputs if o is not None], whole)


def run_heads(heads: Sequence[nn.Module], groups: Sequence[Sequence[int]], image: Tensor,
              layers: Sequence[StackedLayer]) -> list[Tensor]:
    """Head ``t`` on the path ``[image, layers[0].outputs[t], ...]``, heads of one structure stacked."""
    outputs: list[Tensor | None] = [None] * len(heads)
    for idx in groups:
        members = [heads[i] for i in idx]
        if not stackable(members):
            for i in idx:
                outputs[i] = heads[i]([image, *(layer.outputs[i] for layer in layers)])
            continue
        path = [image, *(layer.gather(idx) for layer in layers)]
        y = stacked_call(members, path, in_dims=[None] + [0] * len(layers))
        for i, yi in zip(idx, y.unbind(0)):
            outputs[i] = yi
    return [o for o in outputs if o is not None]


def _groups(anchor: Streams) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Structure groups of every layer's nodes and of the heads, computed once per anchor (structures never
    change after construction)."""
    cache = getattr(anchor, "_stack_groups", None)
    if cache is None:
        layers = [stack_groups([anchor.node(k, t) for t in range(anchor.n_tasks)]) for k in range(anchor.n_layers)]
        cache = (layers, stack_groups(list(anchor.heads)))
        object.__setattr__(anchor, "_stack_groups", cache)
    return cache


def stacked_anchor_forward(anchor: Streams, x: Tensor) -> list[Tensor]:
    """The anchor architecture (N separate streams) with every layer's nodes as one stacked call; the
    heads' outputs in task order, equal to ``dymu.anchor.route`` on the anchor architecture."""
    layer_groups, head_groups = _groups(anchor)
    layers: list[StackedLayer] = []
    current: StackedLayer | Tensor = x
    for k in range(anchor.n_layers):
        current = run_layer([anchor.node(k, t) for t in range(anchor.n_tasks)], layer_groups[k], current)
        layers.append(current)
    return run_heads(list(anchor.heads), head_groups, x, layers)


def stacked_sampled_forward(anchor: Streams, x: Tensor, layer_weights: Callable[[int], Tensor]) -> list[Tensor]:
    """The edge stage's forward (every node computed, each child's path the weighted mix of its parents'
    paths, ``dymu.anchor.mix_paths``) with every layer's nodes as one stacked call and each mix one
    ``einsum`` on the stacked features. ``layer_weights(k)`` gives layer ``k``'s mixing weights, ``(N, N)``
    or ``(B, N, N)``."""
    layer_groups, head_groups = _groups(anchor)
    n, n_layers = anchor.n_tasks, anchor.n_layers
    paths = [run_layer([anchor.node(0, t) for t in range(n)], layer_groups[0], x)]
    for k in range(1, n_layers):
        w = layer_weights(k - 1)
        mixed = [_as_layer(mix_stacked(p.gather(range(n)), w)) for p in paths]
        paths = [*mixed, run_layer([anchor.node(k, t) for t in range(n)], layer_groups[k], mixed[-1])]
    w = layer_weights(n_layers - 1)
    mixed = [_as_layer(mix_stacked(p.gather(range(n)), w)) for p in paths]
    return run_heads(list(anchor.heads), head_groups, x, mixed)


def _as_layer(stacked: Tensor) -> StackedLayer:
    return StackedLayer(list(stacked.unbind(0)), stacked)


__all__ = ["StackedLayer", "mix_stacked", "run_heads", "run_layer", "stack_groups", "stackable",
           "stacked_anchor_forward", "stacked_call", "stacked_sampled_forward"]
