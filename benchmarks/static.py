"""Hand-built static networks: the baselines a specialised ``SpecializedNet`` and the anchor are timed against.

They hold the same block modules but no routing: the order of the nodes and each node's parent are fixed once
at construction, so the forward is a flat loop of module calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dymu.anchor import SpecializedNet


class SingleTaskNet(nn.Module):
    """One task's network: its L blocks in order and its head on the path ``[x, y_0, ..., y_{L-1}]``."""

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks, self.head = nn.ModuleList(blocks), head

    def forward(self, x: Tensor) -> Tensor:
        path = [x]
        for block in self.blocks:
            path.append(block(path[-1]))
        return self.head(path)


class StaticTree(nn.Module):
    """A tree as a fixed list of steps: node ``i`` reads feature ``parents[i]`` and appends its output; head
    ``t`` reads the features ``paths[t]``. Built from a specialised net's own blocks and heads."""

    def __init__(self, spec: SpecializedNet) -> None:
        super().__init__()
        arch = spec.architecture
        used = arch.used_nodes()
        nodes, parents = [], []
        path_of: dict[tuple[int, int], list[int]] = {}
        for k in range(arch.n_layers):
            for t in sorted(used[k]):
                parent_path = [0] if k == 0 else path_of[(k - 1, arch.parents[k - 1][t])]
                nodes.append(spec.node(k, t))
                parents.append(parent_path[-1])
                path_of[(k, t)] = [*parent_path, len(nodes)]
        self.nodes = nn.ModuleList(nodes)
        self.parents = parents
        self.paths = [path_of[(arch.n_layers - 1, arch.parents[-1][t])] for t in range(arch.n_tasks)]
        self.heads = spec.heads
        self.task_names = list(spec.task_names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = [x]
        for node, parent in zip(self.nodes, self.parents):
            features.append(node(features[parent]))
        return {name: head([features[i] for i in path])
                for name, head, path in zip(self.task_names, self.heads, self.paths)}
