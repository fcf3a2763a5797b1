"""The anchor net: N single-task streams of L blocks and N heads, routed by an architecture.

Three forward modes, one routing rule (child ``(k+1, j)`` consumes the path of its parent):

- a fixed architecture: only the used nodes are computed (inference, stage 3);
- samples ``nu`` of shape ``(L, N, N)`` (hard straight-through or soft): every node is computed and a
  child's input is the ``nu``-weighted mix of the parents' paths, so the gradient reaches every edge
  logit (stage 2);
- both with BatchNorm affine parameters shifted by the weight hypernet (``bn_deltas``).

``specialize`` copies the used nodes into a plain static module whose forward is the same routing rule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dymu.backbones.base import Backbone, Path
from dymu.search_space import Architecture, as_architecture
from dymu.stacked import mix_stacked, stacked_anchor_forward, stacked_sampled_forward
from dymu.tasks import Task

BNDeltas = Mapping[str, tuple[Tensor, Tensor]]
"""Per BatchNorm (named as in ``AnchorNet.named_modules``): ``(delta_gamma, delta_beta)``."""


def route(x: Tensor, architecture: Architecture, node: Callable[[int, int], nn.Module],
          heads: Sequence[nn.Module]) -> list[Tensor]:
    """Compute the used nodes of ``architecture`` bottom up and return every head's output (task order)."""
    used = architecture.used_nodes()
    paths: dict[int, Path] = {t: [x, node(0, t)(x)] for t in sorted(used[0])}
    for k in range(1, architecture.n_layers):
        parents = architecture.parents[k - 1]
        paths = {j: [*paths[parents[j]], node(k, j)(paths[parents[j]][-1])] for j in sorted(used[k])}
    last = architecture.parents[-1]
    return [head(paths[last[t]]) for t, head in enumerate(heads)]


def mix_paths(paths: Sequence[Path], weights: Tensor) -> list[Path]:
    """Child ``j``'s path = ``sum_i weights[j, i] * paths[i]``, element-wise along the path.

    ``weights`` is ``(N, N)`` (one mix for the whole batch) or ``(B, N, N)`` (one mix per sample: several
    preferences in one batch). The input ``x`` (position 0) is shared by every path and the weights of a
    child sum to one, so it is passed through unmixed.
    """
    n_children = weights.shape[-2]
    mixed: list[Path] = [[paths[0][0]] for _ in range(n_children)]
    for m in range(1, len(paths[0])):
        combined = mix_stacked(torch.stack([p[m] for p in paths]), weights)
        for j in range(n_children):
            mixed[j].append(combined[j])
    return mixed


def batchnorm_names(module: nn.Module) -> dict[str, int]:
    """Names and channel counts of the BatchNorms inside the branching blocks (``streams``)."""
    return {name: m.num_features for name, m in module.named_modules()
            if name.startswith("streams.") and isinstance(m, nn.modules.batchnorm._BatchNorm)}


def modulated_bn_parameters(module: nn.Module, bn_deltas: BNDeltas) -> dict[str, Tensor]:
    """The modulated BatchNorm: ``gamma + delta_gamma`` and ``beta + delta_beta`` for every named BN.

    Returned as a parameter dict for ``torch.func.functional_call``, so the anchor's own tensors are never
    written and gradients flow to the deltas.
    """
    modules = dict(module.named_modules())
    out: dict[str, Tensor] = {}
    for name, (d_gamma, d_beta) in bn_deltas.items():
        bn = modules.get(name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise KeyError(f"{name!r} is not a BatchNorm of this network")
        out[f"{name}.weight"] = bn.weight + d_gamma
        out[f"{name}.bias"] = bn.bias + d_beta
    return out


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm in ``module`` normalise with the statistics of the batch it sees, in train and
    eval mode alike (the running statistics are dropped). Used on specialized copies."""
    for bn in _batchnorms(module):
        bn.track_running_stats = False
        bn.running_mean, bn.running_var, bn.num_batches_tracked = None, None, None


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, the BatchNorms of ``module``'s branching blocks use batch statistics and leave the
    running statistics untouched; afterwards everything is as before."""
    saved = []
    for name, bn in module.named_modules():
        if name.startswith("streams.") and isinstance(bn, nn.modules.batchnorm._BatchNorm):
            saved.append((bn, bn.track_running_stats, bn.running_mean, bn.running_var, bn.num_batches_tracked))
            bn.track_running_stats = False
            bn.running_mean, bn.running_var, bn.num_batches_tracked = None, None, None
    try:
        yield
    finally:
        for bn, track, mean, var, count in saved:
            bn.track_running_stats = track
            bn.running_mean, bn.running_var, bn.num_batches_tracked = mean, var, count


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, inputs: Iterable[Tensor]) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm in ``module`` (a specialised tree) as the plain
    average over ``inputs`` (a few training batches), then put it in eval mode: deployable statistics for a
    tree whose blocks see another stream's features, with no dependence on the test batch."""
    bns = _batchnorms(module)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        if bn.running_mean is None:
            raise ValueError("recalibrate_batchnorm needs BatchNorms that track running statistics")
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    module.train()
    count = 0
    for x in inputs:
        module(x)
        count += 1
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    if count == 0:
        raise ValueError("recalibrate_batchnorm got no input batches")
    return module.eval()


@dataclass(frozen=True)
class BatchNormCopies:
    """BatchNorms of an anchor paired with their copies in a specialised net (``AnchorNet.batchnorm_copies``):
    ``names`` in the anchor, ``sources`` and ``targets`` their ``(weight, bias)`` pairs, flattened."""

    names: tuple[str, ...]
    sources: tuple[Tensor, ...]
    targets: tuple[Tensor, ...]


class AnchorNet(nn.Module):
    """N streams of L blocks (each with its own single-task weights) and N heads.

    Args:
        backbone: how one stream is cut into blocks and how heads are built.
        tasks: the N tasks, in order.
        stacked: run the N streams of the anchor architecture and of the sampled forward as one batched call
            per layer (``dymu.stacked``; same outputs, gradients and BatchNorm statistics); an execution
            choice, not part of the model's config. Off by default: on CPU it measured slower
            (docs/performance.md).
    """

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], stacked: bool = False) -> None:
        super().__init__()
        self.stacked = stacked
        if not tasks:
            raise ValueError("an anchor net needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        self.task_names = names
        self.backbone_config = backbone.config()
        self.task_configs = [t.to_config() for t in tasks]
        self.streams = nn.ModuleList([nn.ModuleList(backbone.make_blocks()) for _ in tasks])
        self.heads = nn.ModuleList([backbone.make_head(t) for t in tasks])

    @property
    def n_tasks(self) -> int:
        return len(self.streams)

    @property
    def n_layers(self) -> int:
        return len(self.streams[0])

    def node(self, layer: int, stream: int) -> nn.Module:
        """Block ``layer`` of stream ``stream`` (0-based)."""
        return self.streams[stream][layer]

    def forward(self, x: Tensor, architecture: Architecture | Sequence[Sequence[int]] | None = None,
                samples: Tensor | None = None, bn_deltas: BNDeltas | None = None) -> dict[str, Tensor]:
        """Task outputs, keyed by task name.

        Args:
            x: the input batch.
            architecture: a fixed tree (only its used nodes are computed); default: the anchor itself.
            samples: edge samples ``(L, N, N)`` (child, parent), or ``(B, L, N, N)`` with one per sample; if
                given, every node is computed and mixed.
            bn_deltas: BatchNorm shifts from the weight hypernet.
        """
        if bn_deltas:
            params = modulated_bn_parameters(self, bn_deltas)
            return functional_call(self, params, (x,), {"architecture": architecture, "samples": samples})
        if samples is not None:
            outputs = self._forward_sampled(x, samples)
        else:
            anchor = Architecture.anchor(self.n_tasks, self.n_layers)
            arch = anchor if architecture is None else self.check_architecture(architecture)
            if self.stacked and arch == anchor:
                outputs = stacked_anchor_forward(self, x)
            else:
                outputs = route(x, arch, self.node, self.heads)
        return dict(zip(self.task_names, outputs))

    def _forward_sampled(self, x: Tensor, samples: Tensor) -> list[Tensor]:
        expected = (self.n_layers, self.n_tasks, self.n_tasks)
        per_sample = samples.ndim == 4
        if tuple(samples.shape[-3:]) != expected or samples.ndim not in (3, 4) or (
                per_sample and samples.shape[0] != x.shape[0]):
            raise ValueError(f"edge samples must have shape {expected} or (batch {x.shape[0]}, *{expected}), "
                             f"got {tuple(samples.shape)}")
        layer = (lambda k: samples[:, k]) if per_sample else (lambda k: samples[k])
        if self.stacked:
            return stacked_sampled_forward(self, x, layer)
        paths: list[Path] = [[x, self.node(0, t)(x)] for t in range(self.n_tasks)]
        for k in range(1, self.n_layers):
            mixed = mix_paths(paths, layer(k - 1))
            paths = [[*p, self.node(k, j)(p[-1])] for j, p in enumerate(mixed)]
        mixed = mix_paths(paths, layer(self.n_layers - 1))
        return [head(p) for head, p in zip(self.heads, mixed)]

    def check_architecture(self, architecture: Architecture | Sequence[Sequence[int]]) -> Architecture:
        arch = as_architecture(architecture)
        if (arch.n_layers, arch.n_tasks) != (self.n_layers, self.n_tasks):
            raise ValueError(f"architecture has {arch.n_layers} layers x {arch.n_tasks} tasks, the anchor has "
                             f"{self.n_layers} x {self.n_tasks}")
        return arch

    @torch.no_grad()
    def stream_features(self, x: Tensor) -> list[list[Tensor]]:
        """``f[t][l]``: output of node ``(l, t)`` when the anchor runs as N separate networks."""
        feats = []
        for t in range(self.n_tasks):
            y, per_layer = x, []
            for k in range(self.n_layers):
                y = self.node(k, t)(y)
                per_layer.append(y)
            feats.append(per_layer)
        return feats

    def batchnorm_copies(self, blocks: nn.ModuleDict) -> BatchNormCopies:
        """The BatchNorms of this anchor's branching blocks that ``blocks`` holds copies of (used nodes keyed
        ``"{layer}_{stream}"``, as in ``specialize``), paired with their copies."""
        names, sources, targets = [], [], []
        for name in batchnorm_names(self):
            _, stream, layer, *rest = name.split(".")
            key = f"{layer}_{stream}"
            if key in blocks:
                source, target = self.get_submodule(name), blocks[key].get_submodule(".".join(rest))
                names.append(name)
                sources += [source.weight, source.bias]
                targets += [target.weight, target.bias]
        return BatchNormCopies(tuple(names), tuple(sources), tuple(targets))

    @torch.no_grad()
    def bake_bn_deltas(self, blocks: nn.ModuleDict, bn_deltas: BNDeltas, copies: BatchNormCopies | None = None
                       ) -> None:
        """Set the affine parameters of the BatchNorm copies in ``blocks`` to this anchor's
        ``gamma + delta_gamma`` and ``beta + delta_beta``; deltas of nodes that ``blocks`` lacks are skipped.
        ``copies``: ``batchnorm_copies(blocks)``, if already known (a switch between preferences of one tree
        then costs two batched tensor operations)."""
        if copies is None:
            unknown = set(bn_deltas) - set(batchnorm_names(self))
            if unknown:
                raise KeyError(f"{sorted(unknown)[:3]} are not BatchNorms of this network's branching blocks")
            copies = self.batchnorm_copies(blocks)
        if not copies.names:
            return
        if all(n in bn_deltas for n in copies.names):
            sources, targets = list(copies.sources), list(copies.targets)
            deltas = [d for n in copies.names for d in bn_deltas[n]]
        else:
            kept = [i for i, n in enumerate(copies.names) if n in bn_deltas]
            sources = [copies.sources[2 * i + j] for i in kept for j in (0, 1)]
            targets = [copies.targets[2 * i + j] for i in kept for j in (0, 1)]
            deltas = [d for i in kept for d in bn_deltas[copies.names[i]]]
        if not targets:
            return
        if deltas[0].dtype != targets[0].dtype or deltas[0].device != targets[0].device:
            deltas = [d.to(t) for d, t in zip(deltas, targets)]
        torch._foreach_copy_(targets, torch._foreach_add(sources, [d.detach() for d in deltas]))

    def specialize(self, architecture: Architecture | Sequence[Sequence[int]],
                   bn_deltas: BNDeltas | None = None, bn_statistics: str = "running") -> SpecializedNet:
        """A static module holding copies of only the used nodes (BN shifts baked in) and the heads.

        With ``bn_statistics="batch"`` the copied blocks' BatchNorms normalise with batch statistics.
        """
        arch = self.check_architecture(architecture)
        used = arch.used_nodes()
        blocks = nn.ModuleDict()
        for k, nodes in enumerate(used):
            for t in sorted(nodes):
                blocks[f"{k}_{t}"] = copy.deepcopy(self.node(k, t))
        if bn_deltas:
            self.bake_bn_deltas(blocks, bn_deltas)
        if bn_statistics == "batch":
            use_batch_statistics(blocks)
        return SpecializedNet(blocks, copy.deepcopy(self.heads), arch, self.task_names).train(self.training)


class SpecializedNet(nn.Module):
    """A pruned, static multi-task network for one preference: plain ``nn.Module``, no hypernets.

    Attributes:
        architecture: the tree it computes.
        blocks: used nodes, keyed ``"{layer}_{stream}"``.
        heads: one per task.
    """

    def __init__(self, blocks: nn.ModuleDict, heads: nn.ModuleList, architecture: Architecture,
                 task_names: Sequence[str]) -> None:
        super().__init__()
        self.blocks, self.heads = blocks, heads
        self.architecture = architecture
        self.task_names = list(task_names)

    def node(self, layer: int, stream: int) -> nn.Module:
        return self.blocks[f"{layer}_{stream}"]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.task_names, route(x, self.architecture, self.node, self.heads)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class NodeCosts:
    """Parameters and FLOPs (batch 1) of every block node ``[layer][stream]`` and every head."""

    node_params: tuple[tuple[int, ...], ...]
    node_flops: tuple[tuple[int, ...], ...]
    head_params: tuple[int, ...]
    head_flops: tuple[int, ...]

    def cost(self, architecture: Architecture) -> dict[str, int]:
        """``params`` and ``flops`` of the pruned network: its used nodes plus the N heads."""
        used = architecture.used_nodes()
        params = sum(self.node_params[k][t] for k, nodes in enumerate(used) for t in nodes)
        flops = sum(self.node_flops[k][t] for k, nodes in enumerate(used) for t in nodes)
        return {"params": params + sum(self.head_params), "flops": flops + sum(self.head_flops)}


def cached_node_costs(anchor: AnchorNet, input_shape: Sequence[int] | None) -> NodeCosts:
    """``node_costs`` measured once per anchor and input shape (the costs depend on shapes, not weights)."""
    if input_shape is None:
        raise RuntimeError("cost needs the input shape: build the model with input_shape=...")
    cache: dict[tuple[int, ...], NodeCosts] = anchor.__dict__.setdefault("_node_costs_cache", {})
    key = tuple(int(v) for v in input_shape)
    if key not in cache:
        cache[key] = node_costs(anchor, key)
    return cache[key]


def node_costs(anchor: AnchorNet, input_shape: Sequence[int]) -> NodeCosts:
    """Measure every node once (a node's input shape does not depend on the tree) so that the cost of
    any architecture is a sum, with no forward pass per architecture."""
    was_training = anchor.training
    anchor.eval()
    param = next(anchor.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    n_params, n_flops = [], []
    with torch.no_grad():
        paths: list[Path] = [[x] for _ in range(anchor.n_tasks)]
        for k in range(anchor.n_layers):
            row_p, row_f = [], []
            for t in range(anchor.n_tasks):
                block, inp = anchor.node(k, t), paths[t][-1]
                row_f.append(count_flops(lambda b=block, i=inp: b(i)))
                row_p.append(count_parameters(block))
                paths[t].append(block(inp))
            n_params.append(tuple(row_p))
            n_flops.append(tuple(row_f))
        head_f = tuple(count_flops(lambda h=h, p=p: h(p)) for h, p in zip(anchor.heads, paths))
    anchor.train(was_training)
    return NodeCosts(tuple(n_params), tuple(n_flops), tuple(count_parameters(h) for h in anchor.heads), head_f)
