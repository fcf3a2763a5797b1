"""Learning to Branch (Guo, Lee and Ulbricht, ICML 2020; seeds/001), a static tree search over DYMU's search space,
and ``TreeSearchNet``, what the static tree searches (this one and BMTAS) share.

Mapping to the paper (section 3):

- The branching block (parent nodes ``i``, child nodes ``j``, one categorical distribution ``theta_j`` per child)
  is one layer of the anchor's tree space: child ``(k + 1, j)`` picks its parent ``(k, i)`` among the N nodes of
  block layer ``k``, and the heads pick theirs in the last block layer (LTB's task-specific layers are children
  too). The N x L nodes are the anchor's (``dymu.anchor.AnchorNet``), so the N streams start either from the
  single-task networks of a DYMU anchor checkpoint or from scratch.
- ``log theta`` is the learnable ``logits`` tensor ``(L, N, N)`` in DYMU's edge-logit convention (row = child,
  column = parent; the paper's matrix ``M`` is its transpose), zero at the start: every parent equally likely
  (the paper's figure 2a).
- One Gumbel sample per step (Eq. 4) gives a discrete tree in the forward pass and the Gumbel-softmax gradient
  (Eq. 5) in the backward pass: ``dymu.hypernets.gumbel_samples``'s straight-through sample routed by
  ``AnchorNet``'s sampled forward, which computes every node so that every parent's output exists for that
  gradient.
- Weights and branching distributions are trained jointly on the task loss (Eq. 1), with their own learning
  rates; during a warm-up of W steps the distributions are not updated "to ensure all weight matrices receive
  equal amounts of update gradients" (section 4.1). The temperature decays after the warm-up
  (``ltb_temperature``).
- The final tree is the noise-free argmax (Eq. 7, ``Architecture.from_logits``), stored in the checkpoint in
  DYMU's format (``Architecture.to_list``), so ``AnchorNet.specialize``, ``NodeCosts.cost`` and the export work
  on it. The paper retrains the found tree from scratch; that is the architecture evaluation's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dymu.anchor import AnchorNet, NodeCosts, SpecializedNet, cached_node_costs
from dymu.backbones.base import Backbone
from dymu.baselines.base import BaselineModel
from dymu.checkpoint import META_KEY, load_checkpoint
from dymu.hypernets import gumbel_samples
from dymu.search_space import Architecture
from dymu.tasks import Task

ARCHITECTURE_KEY = "architecture"
"""Key, in a tree search's checkpoint metadata (``checkpoint["dymu"]``), of its found tree (``Architecture.to_list``)."""


def found_architecture(path: str | Path) -> Architecture:
    """The tree a static search (LTB, BMTAS) stored in its checkpoint, read with ``weights_only=True``.

    Raises:
        ValueError: the checkpoint holds no found tree (another stage's checkpoint).
    """
    meta = load_checkpoint(path)[META_KEY]
    if ARCHITECTURE_KEY not in meta:
        raise ValueError(f"{path} holds no searched tree (stage {meta.get('stage')!r}); give the checkpoint of a "
                         "tree search stage (ltb, bmtas)")
    return Architecture(tuple(tuple(row) for row in meta[ARCHITECTURE_KEY]))


def ltb_temperature(step: int, warmup_steps: int = 0, start: float = 10.0, power: float = 0.5,
                    every: int = 1) -> float:
    """Gumbel temperature ``start * (1 + s) ** -power`` with ``s = max(0, step - warmup_steps) // every``.

    The paper's two schedules: the synthetic experiment starts at 50 and is "decayed by the square root of the
    number of iterations" (``power=0.5, every=1``); CelebA and Taskonomy start at 10, "decayed by the number of
    epochs" (``power=1``, ``every`` = steps per epoch). The temperature stays at ``start`` during the warm-up.
    """
    if start <= 0 or power < 0 or every < 1:
        raise ValueError(f"need start > 0, power >= 0 and every >= 1, got {start}, {power}, {every}")
    return start * (1 + max(0, step - warmup_steps) // every) ** (-power)


class TreeSearchNet(BaselineModel):
    """An anchor net (the supergraph: N streams of L blocks, N heads) and architecture logits ``(L, N, N)``; the
    network that runs is the tree the logits select (``architecture``), computed on the anchor's nodes.

    ``forward(x, r)`` runs that tree (``r`` is ignored: a static search finds one tree);
    ``inference_network()`` is ``anchor.specialize(tree)``, so ``cost`` counts its used nodes and heads.

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
    """

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None) -> None:
        super().__init__(backbone, tasks, input_shape)
        self.anchor = AnchorNet(backbone, tasks)
        n, n_layers = self.anchor.n_tasks, self.anchor.n_layers
        self.logits = nn.Parameter(torch.zeros(n_layers, n, n))

    def architecture(self) -> Architecture:
        """The tree the current logits select."""
        raise NotImplementedError

    def weight_parameters(self) -> list[nn.Parameter]:
        """The network weights (the anchor's), apart from the architecture logits."""
        return list(self.anchor.parameters())

    def load_anchor(self, state: Mapping[str, Tensor]) -> None:
        """Start the N streams and heads from an anchor's weights (``state``: an ``AnchorNet`` state dict)."""
        self.anchor.load_state_dict(state)

    def node_costs(self) -> NodeCosts:
        """Parameters and FLOPs of every node, measured once with the flop counter."""
        return cached_node_costs(self.anchor, self.input_shape)

    def forward(self, x: Tensor, r: Any = None, c: Any = None) -> dict[str, Tensor]:
        """Task outputs of the found tree (only its used nodes are computed); ``r`` and ``c`` are ignored."""
        return self.anchor(x, architecture=self.architecture())

    def inference_network(self) -> SpecializedNet:
        return self.anchor.specialize(self.architecture())


class LearnToBranchNet(TreeSearchNet):
    """Learning to Branch's supergraph: ``logits[k, j, i]`` is ``log theta`` of child ``j`` of layer ``k + 1``
    picking parent ``i`` of block layer ``k`` (row ``L - 1``: the heads' parents).

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
        nodes_per_layer: K, the child nodes of each branching block (the paper's synthetic experiment: 3 for 15
            tasks); default N, one per task. Every child picks its parent among the first K nodes of the layer
            below, so only K nodes per layer can be used and tasks must share them; the other logits are masked.
    """

    kind = "ltb"

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None,
                 nodes_per_layer: int | None = None) -> None:
        super().__init__(backbone, tasks, input_shape)
        n = self.anchor.n_tasks
        k = n if nodes_per_layer is None else int(nodes_per_layer)
        if not 1 <= k <= n:
            raise ValueError(f"nodes_per_layer must be between 1 and the number of tasks ({n}), got {nodes_per_layer}")
        self.nodes_per_layer = k
        mask = torch.zeros_like(self.logits)
        mask[..., k:] = float("-inf")  # parents beyond the block's K children
        self.register_buffer("parent_mask", mask, persistent=False)

    def masked_logits(self) -> Tensor:
        return self.logits + self.parent_mask

    def architecture(self) -> Architecture:
        """The noise-free argmax of every child's distribution (the paper's Eq. 7)."""
        return Architecture.from_logits(self.masked_logits().detach())

    def branching_probabilities(self) -> Tensor:
        """``theta``: ``(L, N, N)``, each child's distribution over its parents."""
        return self.masked_logits().softmax(dim=-1)

    def search_forward(self, x: Tensor, temperature: float, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Task outputs of one sampled tree: discrete in the forward pass, Gumbel-softmax gradient to the logits.

        Args:
            x: input batch.
            temperature: Gumbel-softmax temperature.
            noise: standard Gumbel noise shaped like the logits (tests); default: drawn.
        """
        hard, _ = gumbel_samples(self.masked_logits(), temperature, noise=noise)
        return self.anchor(x, samples=hard)
