"""The edge hypernet ``h`` (preference -> edge logits) and the weight hypernet ``h-bar`` (preference ->
BatchNorm shifts). The modulated BatchNorm itself is ``dymu.anchor.modulated_bn_parameters``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.preference import PreferenceEmbedding


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with a ReLU after every one (the heads that follow are linear)."""
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class EdgeHypernet(nn.Module):
    """``(r, c) -> log alpha`` of shape ``(L, N, N)`` (row = child, column = parent).

    Embedding ``sum_t r_t e_t + c e_c`` (dim 32), MLP 32 -> 100 -> 100 with ReLU, L linear heads 100 -> N*N.
    The heads start at zero: uniform edge probabilities for every preference. A batch of preferences
    (``r`` of shape ``(G, N)``, ``c`` of shape ``(G,)``) gives logits ``(G, L, N, N)``.

    Args:
        pin_heads: every head keeps its own stream's last block (the heads' parent choice is not searched;
            the third reading of the layer weighting in docs/method.md, "The regularizer Omega").
        c_conditioning: how ``c`` enters. ``"embedding"`` (the paper's): ``c e_c`` in the embedding, like
            ``r``. ``"affine"``: the logits are ``a(r) + c b(r)``, two sets of heads on an embedding of ``r``
            alone, so the tree at ``c = 0`` has parameters of its own and each edge's preference moves
            monotonically with ``c`` (docs/controllability.md).
    """

    C_CONDITIONINGS = ("embedding", "affine")

    def __init__(self, n_tasks: int, n_layers: int, embed_dim: int = 32, hidden: int = 100,
                 pin_heads: bool = False, c_conditioning: str = "embedding") -> None:
        super().__init__()
        if c_conditioning not in self.C_CONDITIONINGS:
            raise ValueError(f"c_conditioning must be one of {self.C_CONDITIONINGS}, got {c_conditioning!r}")
        self.n_tasks, self.n_layers = n_tasks, n_layers
        self.pin_heads = bool(pin_heads)
        self.c_conditioning = c_conditioning
        self.size_args: dict[str, int | bool | str] = {"embed_dim": embed_dim, "hidden": hidden}
        if self.pin_heads:
            self.size_args["pin_heads"] = True
        if c_conditioning != "embedding":
            self.size_args["c_conditioning"] = c_conditioning
        self.embedding = PreferenceEmbedding(n_tasks, embed_dim)
        self.body = mlp([embed_dim, hidden, hidden])
        self.heads = nn.ModuleList([nn.Linear(hidden, n_tasks * n_tasks) for _ in range(n_layers)])
        self.c_heads = nn.ModuleList([nn.Linear(hidden, n_tasks * n_tasks) for _ in range(n_layers)]) \
            if c_conditioning == "affine" else None
        # Every parent starts equally likely for every preference (Learning to Branch's uniform start)
        # rather than at a random tree that the initialisation would pick.
        for head in [*self.heads, *(self.c_heads or [])]:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, r: Tensor, c: Tensor) -> Tensor:
        affine = self.c_heads is not None
        z = self.body(self.embedding(r, torch.zeros_like(c) if affine else c))
        shape = (*z.shape[:-1], self.n_tasks, self.n_tasks)
        logits = torch.stack([h(z).view(shape) for h in self.heads], dim=-3)
        if self.c_heads is not None:
            slope = torch.stack([h(z).view(shape) for h in self.c_heads], dim=-3)
            logits = logits + torch.as_tensor(c, dtype=logits.dtype, device=logits.device)[..., None, None, None] \
                * slope
        if self.pin_heads:
            # a large finite gap rather than -inf: the soft samples stay exactly one-hot without NaN gradients
            eye = torch.eye(self.n_tasks, dtype=torch.bool, device=logits.device)
            pinned = torch.where(eye, 0.0, -1e4).to(logits.dtype).expand_as(logits[..., -1, :, :])
            logits = torch.cat([logits[..., :-1, :, :], pinned.unsqueeze(-3)], dim=-3)
        return logits


def gumbel_samples(logits: Tensor, temperature: float | Tensor, generator: torch.Generator | None = None,
                   noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gumbel-softmax samples of every child's parent: ``(hard straight-through, soft)``, shaped like ``logits``
    (``(L, N, N)``, or ``(G, L, N, N)`` for G preferences).

    The hard sample is one-hot in the forward pass and carries the soft sample's gradient. ``noise``
    (standard Gumbel, shaped like ``logits``) replaces the drawn noise, for tests.
    """
    if noise is None:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        exponential = (-torch.log(uniform.clamp_min(1e-10))).clamp_min(1e-10)
        noise = -torch.log(exponential)
    soft = F.softmax((logits + noise.to(logits)) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft, soft


class WeightHypernet(nn.Module):
    """``(r, c) -> {bn_name: (delta_gamma, delta_beta)}`` for every BatchNorm of the branching blocks.

    Embedding (dim 32), MLP 32 -> 100 -> 100 -> 100 with ReLU, one linear head per BatchNorm emitting
    ``2 * channels`` values. The heads start at zero so adaptation starts exactly at the stage-2 model.

    Args:
        n_tasks: N.
        batchnorms: BatchNorm name -> channels (``dymu.anchor.batchnorm_names(anchor)``).
        bn_statistics: the modulated BatchNorms normalise with the anchor's ``"running"`` statistics
            (the default; docs/method.md, "Weight hypernet") or with ``"batch"`` statistics.
    """

    def __init__(self, n_tasks: int, batchnorms: Mapping[str, int], embed_dim: int = 32,
                 hidden: int = 100, bn_statistics: str = "running") -> None:
        super().__init__()
        if bn_statistics not in ("running", "batch"):
            raise ValueError(f"bn_statistics must be 'running' or 'batch', got {bn_statistics!r}")
        self.bn_names = list(batchnorms)
        self.bn_statistics = bn_statistics
        self.size_args = {"embed_dim": embed_dim, "hidden": hidden, "bn_statistics": bn_statistics}
        self.embedding = PreferenceEmbedding(n_tasks, embed_dim)
        self.body = mlp([embed_dim, hidden, hidden, hidden])
        self.heads = nn.ModuleList([nn.Linear(hidden, 2 * int(c)) for c in batchnorms.values()])
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, r: Tensor, c: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        z = self.body(self.embedding(r, c))
        out = {}
        for name, head in zip(self.bn_names, self.heads):
            d_gamma, d_beta = head(z).chunk(2)
            out[name] = (d_gamma, d_beta)
        return out
