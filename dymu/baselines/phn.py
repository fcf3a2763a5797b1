"""PHN, the Pareto HyperNetwork (Navon et al., ICLR 2021) as DYMU's appendix G sets it up: a hypernet of the
weight hypernet's shape, with chunking (Ha et al.), generates every weight of the shared multi-task network
from the task preference ``r``.

Hypernet: the preference embedding ``p = sum_t r_t e_t`` (``dymu.preference.PreferenceEmbedding``, dim 32; PHN
has no cost input, so ``c = 0``), the weight hypernet's MLP ``32 -> 100 -> 100 -> 100`` (ReLU) giving ``z``,
K learnable chunk embeddings ``k_1..k_K`` and one linear output layer ``[z; k_i] -> chunk i`` of ``chunk_size``
values. Layout: chunks 1..K concatenated are one flat vector; its first P entries (P = the target's parameter
count, ``K = ceil(P / chunk_size)``, the tail of the last chunk unused) are cut, in the target's
``named_parameters`` order, into the target's parameter shapes.

Initialisation: the raw output ``g`` of the output layer is about standard normal at the start (output
weights ``N(0, 1 / chunk_embed_dim)``, chunk embeddings ``N(0, 1)``, zero bias), and each generated tensor is
``mean_i + std_i * g``, where ``mean_i, std_i`` are the mean and standard deviation of the target's own
initial tensor ``i`` (``CONSTANT_INIT_SCALE`` where that tensor was constant, e.g. a BatchNorm's ``gamma = 1``).
These are fixed buffers, not parameters: every weight stays a function of ``r`` through the hypernet, and
the generated network starts with its backbone's initialisation statistics rather than with unit-variance
weights that would blow up the heads (whose last conv has no BatchNorm after it).

BatchNorm: the affine parameters ``gamma, beta`` are generated like every other weight. The target's own
buffers hold the statistics. ``bn_statistics="batch"`` (the default) normalises with the statistics of the
batch in training and at inference, exact for whichever weights a preference generates;
``"running"`` keeps running statistics, updated in training by whatever weights the sampled preferences
generate (a mixture over preferences, wrong for any one of them unless re-estimated per preference:
``materialize(r)`` then ``dymu.anchor.recalibrate_batchnorm``).

Sizes at paper scale (``chunk_embed_dim=64``, ``embed_dim=32``, ``hidden=100``; ``chunk_size_for`` finds the
chunk size of a paper's control-parameter count, DYMU tables 1-4):

=========================  ============  ==========  ======  ==========================
setting                    target        chunk size  chunks  control params (paper)
=========================  ============  ==========  ======  ==========================
PASCAL-Context, 5 tasks    2,151,505     130,152     17      21,499,860 (21.50M)
PASCAL-Context, 3 tasks    2,062,957     127,728     17      21,099,836 (21.10M)
NYU-v2 (its config's net)  21,592,764    127,306     170     21,039,998 (21.04M)
CIFAR-100 (ResNet-9 0.525) 1,839,288     66,691      28      11,029,979 (11.03M)
=========================  ============  ==========  ======  ==========================

The targets match the paper's PHN inference parameters (2.15M, 2.06M, 21.59M) except on CIFAR-100, where the
paper's shared network has 16.35M parameters and one ResNet-9 stream with 20 linear heads 1.84M.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dymu.anchor import use_batch_statistics
from dymu.backbones.base import Backbone
from dymu.baselines.base import (
    BaselineModel,
    check_bn_statistics,
    restore_parameters,
    shared_network,
    strip_parameters,
)
from dymu.hypernets import mlp
from dymu.preference import Preference, PreferenceEmbedding
from dymu.tasks import Task

HIDDEN_LAYERS = 3
"""Hidden layers of the MLP, as in the weight hypernet (DYMU appendix G: PHN is "similar")."""

CONSTANT_INIT_SCALE = 0.1
"""Spread of the generated values of a tensor that its backbone initialises to a constant."""


def phn_control_parameters(target_params: int, n_tasks: int, chunk_size: int, chunk_embed_dim: int,
                           embed_dim: int = 32, hidden: int = 100) -> int:
    """The parameter count of a PHN for a target of ``target_params`` parameters (the hand formula).

    ``(N + 1) e`` (task and cost embeddings) ``+ e h + h + 2 (h^2 + h)`` (MLP) ``+ K k`` (chunk embeddings,
    ``K = ceil(P / chunk_size)``) ``+ (h + k + 1) chunk_size`` (output layer), with ``e = embed_dim``,
    ``h = hidden``, ``k = chunk_embed_dim``.
    """
    if min(target_params, n_tasks, chunk_size, chunk_embed_dim, embed_dim, hidden) < 1:
        raise ValueError("every size of a PHN must be >= 1")
    n_chunks = math.ceil(target_params / chunk_size)
    body = embed_dim * hidden + hidden + (HIDDEN_LAYERS - 1) * (hidden * hidden + hidden)
    return ((n_tasks + 1) * embed_dim + body + n_chunks * chunk_embed_dim
            + (hidden + chunk_embed_dim + 1) * chunk_size)


def chunk_size_for(control_params: int, target_params: int, n_tasks: int, chunk_embed_dim: int,
                   embed_dim: int = 32, hidden: int = 100) -> int:
    """The largest chunk size whose PHN has at most ``control_params`` parameters (to match a paper's
    "control params": the count grows with the chunk size once the output layer dominates).

    Raises:
        ValueError: no chunk size gets the count that low.
    """
    def count(size: int) -> int:
        return phn_control_parameters(target_params, n_tasks, size, chunk_embed_dim, embed_dim, hidden)

    # the count is convex in the chunk size: decreasing up to about sqrt(P k / (h + k + 1)), increasing after
    low = max(1, math.isqrt(target_params * chunk_embed_dim // (hidden + chunk_embed_dim + 1)))
    low = min(range(max(1, low - 2), low + 3), key=count)
    if count(low) > control_params:
        raise ValueError(f"no chunk size gives a PHN of at most {control_params} parameters for a target of "
                         f"{target_params} (the smallest, {count(low)}, at chunk size {low})")
    high = target_params
    if count(high) <= control_params:
        return high
    while high - low > 1:  # count(low) <= control_params < count(high)
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) <= control_params else (low, mid)
    return low


class ParetoHypernet(BaselineModel):
    """PHN: ``r -> all weights`` of the shared network, run with ``torch.func.functional_call``.

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
        chunk_size: values per chunk (the output layer's width); the number of chunks follows.
        chunk_embed_dim: size of each chunk embedding.
        embed_dim, hidden: preference embedding size and MLP width (the weight hypernet's 32 and 100).
        bn_statistics: ``"batch"`` or ``"running"`` (module docstring).
    """

    kind = "phn"

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None,
                 chunk_size: int = 10_000, chunk_embed_dim: int = 64, embed_dim: int = 32, hidden: int = 100,
                 bn_statistics: str = "batch") -> None:
        super().__init__(backbone, tasks, input_shape)
        if min(chunk_size, chunk_embed_dim, embed_dim, hidden) < 1:
            raise ValueError(f"chunk_size, chunk_embed_dim, embed_dim and hidden must be >= 1, got {chunk_size}, "
                             f"{chunk_embed_dim}, {embed_dim}, {hidden}")
        self.bn_statistics = check_bn_statistics(bn_statistics)
        self.sizes = {"chunk_size": chunk_size, "chunk_embed_dim": chunk_embed_dim, "embed_dim": embed_dim,
                      "hidden": hidden, "bn_statistics": bn_statistics}
        target = shared_network(backbone, tasks)
        if bn_statistics == "batch":
            use_batch_statistics(target)
        initial = strip_parameters(target)
        self.target = target  # structure and BatchNorm buffers only; its weights are generated
        self.shapes = {name: tuple(v.shape) for name, v in initial.items()}
        self.numels = [v.numel() for v in initial.values()]
        self.target_parameters = sum(self.numels)
        self.n_chunks = math.ceil(self.target_parameters / chunk_size)
        stds = [float(v.float().std(unbiased=False)) for v in initial.values()]
        self.register_buffer("init_mean", torch.tensor([float(v.float().mean()) for v in initial.values()]))
        self.register_buffer("init_std", torch.tensor([s if s > 0 else CONSTANT_INIT_SCALE for s in stds]))

        self.embedding = PreferenceEmbedding(len(tasks), embed_dim)
        self.body = mlp([embed_dim] + [hidden] * HIDDEN_LAYERS)
        self.chunk_embeddings = nn.Parameter(torch.randn(self.n_chunks, chunk_embed_dim))
        self.output = nn.Linear(hidden + chunk_embed_dim, chunk_size)
        nn.init.normal_(self.output.weight, std=chunk_embed_dim ** -0.5)
        nn.init.zeros_(self.output.bias)

    def size_args(self) -> dict[str, Any]:
        return dict(self.sizes)

    def generate(self, r: Tensor) -> dict[str, Tensor]:
        """Every parameter of the target for preference ``r`` (``(N,)``), by name, in the target's shapes."""
        z = self.body(self.embedding(r, torch.zeros((), device=r.device, dtype=r.dtype)))
        rows = torch.cat([z.expand(self.n_chunks, -1), self.chunk_embeddings], dim=1)
        flat = self.output(rows).reshape(-1)[:self.target_parameters]
        return {name: self.init_mean[i] + self.init_std[i] * piece.view(shape)
                for i, ((name, shape), piece) in enumerate(zip(self.shapes.items(), flat.split(self.numels)))}

    def forward(self, x: Tensor, r: Sequence[float] | Tensor | Preference, c: Any = None) -> dict[str, Tensor]:
        """Task outputs of the target on the weights generated for ``r`` (``c`` is ignored)."""
        weights = self.generate(self.preference_r(r, device=x.device))
        return functional_call(self.target, weights, (x,))

    @torch.no_grad()
    def materialize(self, r: Sequence[float] | Tensor | Preference) -> nn.Module:
        """A plain copy of the target holding the weights generated for ``r`` (and the target's buffers)."""
        device = self.init_mean.device
        return restore_parameters(copy.deepcopy(self.target), self.generate(self.preference_r(r, device=device)))

    def inference_network(self) -> nn.Module:
        return self.materialize(Preference.uniform(self.n_tasks))

    def control_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
