"""BMTAS, Branched Multi-Task Architecture Search (Bruggemann, Kanakis, Georgoulis and Van Gool, BMVC 2020;
seeds/003), on DYMU's anchor net, with its proxyless resource loss.

Mapping to the paper:

- **Supergraph** (section 3.1): a chain of L layers with N parallel candidate operations each, duplicates of the
  backbone's layer. Here the candidate operations of layer ``l`` are the anchor's N blocks ``(l, s)``, so
  candidate ``s`` is stream ``s``'s block, already "warmed up on its own task" when the streams come from a DYMU
  anchor (the single-task networks); from scratch, ``warmup_steps`` train every stream on its own task first.
- **Routing** (section 3.2): each task ``t`` has logits ``logits[l, t, :]`` over the N candidates of layer ``l``
  (``logits`` is ``(L, N tasks, N candidates)``, zero at the start), so a task's path is a sequence of stream
  indices ``routing[l][t]``. During the search task ``t``'s feature after layer ``l`` is the soft Gumbel-softmax
  mixture ``sum_s w[l, t, s] * block_(l, s)(feature_(l-1))`` (``task_forward``; the paper's SNAS-style relaxation,
  one forward per task as the paper's "we update the supergraph sequentially for each task"); its head is task
  ``t``'s head of the anchor.
- **Task groupings** (section 3.3): two tasks share the computation of layer ``l`` only if their routings agree
  on layers ``0..l``; the grouping at layer ``l`` is the partition of the tasks by routing prefix, so groupings
  can only split going deeper (a grouping's valid ancestors are the partitions it refines). There are B_N
  groupings (the Bell number: 5 for N = 3, 15 for N = 4, 52 for N = 5).
- **Resource loss** (Eq. 5, 6): the expected cost ``sum_l sum_g P(G_l = g) C_l(g)``, ``C_l(g)`` = number of
  groups of ``g`` times the cost of one candidate of layer ``l`` (a look-up table measured on the anchor with
  the flop counter, ``dymu.anchor.node_costs``), with the recursive probability
  ``P(G_l = g) = sum_{g' in A(g)} P(G_l = g | G_(l-1) = g') P(G_(l-1) = g')``. ``P(G_l = g | g')`` sums, over the
  candidate choices ``Q_l`` of layer ``l`` (independent per task, probabilities ``softmax(logits[l, t])`` as in
  the authors' code), the probability of those with ``meet(g', partition(Q_l)) = g``. This is exact (tested
  against enumerating every routing); the authors' code keeps only ``partition(Q_l) = g`` and gives the missing
  mass to the all-separate grouping. ``ExpectedCost`` computes it; the search uses it relative to N separate
  encoders (``BmtasNet.resource_loss``, between 1/N and 1), so the weight ``lambda`` does not depend on the
  network's size: ``lambda_authors_code = lambda / (GFLOPs of N separate encoders)`` up to the code's counting of
  the resource term once per task.
- **Found tree**: the argmax routing, mapped to DYMU's ``Architecture``: every group of tasks of layer ``l`` (one
  node of the branched network) is placed on the stream of the candidate it chose, its parent is the node of its
  group at layer ``l - 1``, and every head's parent is its task's node of the last layer, so
  ``Architecture.path(t)`` is task ``t``'s routing and ``anchor.specialize(tree)`` computes what the routing
  computes. Where two groups of one layer chose the same candidate (possible in the supergraph, not in a
  tree), the larger group keeps it and the other moves to a free stream, preferably one of its own tasks'
  (``reassigned_groups`` counts them): the paper retrains the found structure from scratch, so only the
  grouping is its result.

The heads (the paper's task-specific decoders) are outside the search and outside the resource loss, as in the
paper (the encoder is searched). Not reproduced: the disabled affine parameters of every operation's last
BatchNorm (section A, a backbone change) and the per-task learning-rate division in the retraining.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from dymu.backbones.base import Backbone
from dymu.baselines.ltb import TreeSearchNet
from dymu.hypernets import gumbel_samples
from dymu.search_space import Architecture
from dymu.tasks import Task

Partition = tuple[tuple[int, ...], ...]
"""A set partition of the tasks ``0..N-1``: blocks sorted, each sorted (a canonical form, so equal partitions are
equal tuples)."""

MAX_TASKS = 6
"""The resource loss enumerates the B_N groupings and the N^N candidate choices of a layer (6 tasks: 203 and
46,656); beyond that the enumeration grows out of reach (B_20 is about 5e13)."""

RESOURCES = ("flops", "params")


def canonical(blocks: Sequence[Sequence[int]]) -> Partition:
    return tuple(sorted(tuple(sorted(b)) for b in blocks if len(b)))


def set_partitions(n: int) -> list[Partition]:
    """Every partition of ``{0..n-1}`` (B_n of them), the coarsest (one block) first."""
    if n < 1:
        raise ValueError(f"need at least one task, got {n}")
    partitions: list[list[list[int]]] = [[[0]]]
    for element in range(1, n):
        grown = []
        for p in partitions:
            grown += [[*p[:i], [*block, element], *p[i + 1:]] for i, block in enumerate(p)]
            grown.append([*p, [element]])
        partitions = grown
    return sorted({canonical(p) for p in partitions}, key=lambda p: (len(p), p))


def partition_of(labels: Sequence[Hashable]) -> Partition:
    """The tasks grouped by equal label (``labels[t]`` for task ``t``)."""
    groups: dict[Hashable, list[int]] = {}
    for task, label in enumerate(labels):
        groups.setdefault(label, []).append(task)
    return canonical(list(groups.values()))


def meet(p: Partition, q: Partition) -> Partition:
    """The coarsest common refinement: tasks share a block iff they share one in ``p`` and in ``q``."""
    return canonical([sorted(set(a) & set(b)) for a in p for b in q])


def refines(fine: Partition, coarse: Partition) -> bool:
    """Whether every block of ``fine`` lies inside a block of ``coarse`` (``coarse`` is a valid ancestor)."""
    return all(any(set(a) <= set(b) for b in coarse) for a in fine)


def groupings(routing: Sequence[Sequence[int]]) -> list[Partition]:
    """The task grouping of every layer of a routing ``routing[l][t]``: tasks grouped by routing prefix."""
    rows = [list(r) for r in routing]
    return [partition_of([tuple(row[t] for row in rows[:layer + 1]) for t in range(len(rows[0]))])
            for layer in range(len(rows))]


class ExpectedCost:
    """The expected cost of a routing distribution, ``sum_l sum_g P(G_l = g) * n_groups(g) * layer_costs[l]``.

    Args:
        n_tasks: N (at most ``MAX_TASKS``).
        layer_costs: the cost of one candidate operation of each layer (L values).
    """

    def __init__(self, n_tasks: int, layer_costs: Sequence[float]) -> None:
        if not 1 <= n_tasks <= MAX_TASKS:
            raise ValueError(f"BMTAS's resource loss enumerates the Bell number of task groupings: N = {n_tasks} is "
                             f"outside 1..{MAX_TASKS}")
        self.n_tasks = n_tasks
        self.partitions = set_partitions(n_tasks)
        index = {p: i for i, p in enumerate(self.partitions)}
        choices = list(itertools.product(range(n_tasks), repeat=n_tasks))
        self.choices = torch.tensor(choices, dtype=torch.long)  # (N^N, N): a candidate for every task
        self.choice_partition = torch.tensor([index[partition_of(c)] for c in choices], dtype=torch.long)
        self.meet_index = torch.tensor([[index[meet(p, q)] for q in self.partitions] for p in self.partitions],
                                       dtype=torch.long)  # (B, B): row = previous grouping, column = choices' partition
        groups = torch.tensor([len(p) for p in self.partitions], dtype=torch.float64)
        self.costs = torch.tensor(list(layer_costs), dtype=torch.float64)[:, None] * groups[None, :]  # (L, B)

    @property
    def n_groupings(self) -> int:
        return len(self.partitions)

    def grouping_probabilities(self, probs: Tensor) -> Tensor:
        """``P(G_l = g)``, ``(L, B)``, for candidate probabilities ``probs[l, t, s]`` (``(L, N, N)``, rows sum to 1)."""
        n_layers, n = probs.shape[0], self.n_tasks
        if tuple(probs.shape) != (self.costs.shape[0], n, n):
            raise ValueError(f"candidate probabilities must have shape {(self.costs.shape[0], n, n)}, got "
                             f"{tuple(probs.shape)}")
        device = probs.device
        choices = self.choices.to(device)
        tasks = torch.arange(n, device=device)
        choice_probs = probs[:, tasks[None, :], choices].prod(dim=-1)  # (L, N^N)
        by_partition = probs.new_zeros(n_layers, self.n_groupings).index_add(
            1, self.choice_partition.to(device), choice_probs)  # P(partition(Q_l) = q)
        meet_index = self.meet_index.to(device)
        current = probs.new_zeros(self.n_groupings)
        current[0] = 1.0  # before layer 0 every task shares the input
        rows = []
        for layer in range(n_layers):
            # transition[g', g] = P(G_l = g | G_(l-1) = g'), non-zero only where g refines g'
            transition = probs.new_zeros(self.n_groupings, self.n_groupings).scatter_add(
                1, meet_index, by_partition[layer].expand(self.n_groupings, -1))
            current = current @ transition
            rows.append(current)
        return torch.stack(rows)

    def __call__(self, probs: Tensor) -> Tensor:
        """The expected cost (a scalar, differentiable in ``probs``)."""
        return (self.grouping_probabilities(probs) * self.costs.to(probs)).sum()


def _stream_assignment(routing: Sequence[Sequence[int]]) -> tuple[list[dict[tuple[int, ...], int]], int]:
    """For every layer, the stream of every group of tasks; and how many groups could not keep their candidate."""
    rows = [list(r) for r in routing]
    n = len(rows[0])
    assignments, moved = [], 0
    for layer, grouping in enumerate(groupings(rows)):
        order = sorted(grouping, key=lambda g: (-len(g), g))
        streams: dict[tuple[int, ...], int] = {}
        for group in order:
            wanted = rows[layer][group[0]]
            if wanted not in streams.values():
                streams[group] = wanted
        for group in order:
            if group not in streams:
                taken = set(streams.values())
                free = [t for t in group if t not in taken] or [s for s in range(n) if s not in taken]
                streams[group] = free[0]
                moved += 1
        assignments.append(streams)
    return assignments, moved


def check_routing(routing: Sequence[Sequence[int]]) -> list[list[int]]:
    rows = [[int(s) for s in r] for r in routing]
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("a routing needs L >= 1 rows of N >= 1 candidate indices (routing[l][t])")
    n = len(rows[0])
    if any(not 0 <= s < n for r in rows for s in r):
        raise ValueError(f"routing candidate indices must lie in 0..{n - 1}, got {rows}")
    return rows


def routing_to_architecture(routing: Sequence[Sequence[int]]) -> Architecture:
    """DYMU's tree for a BMTAS routing ``routing[l][t]`` (the candidate of task ``t`` in layer ``l``): one node per
    group of tasks and layer, on the stream of the candidate the group chose (module docstring)."""
    rows = check_routing(routing)
    n, n_layers = len(rows[0]), len(rows)
    assignments, _ = _stream_assignment(rows)
    parents = [list(range(n)) for _ in range(n_layers)]  # children no task uses keep their own stream (unused)
    for layer in range(1, n_layers):
        for group, stream in assignments[layer].items():
            parent_group = next(g for g in assignments[layer - 1] if set(group) <= set(g))
            parents[layer - 1][stream] = assignments[layer - 1][parent_group]
    for group, stream in assignments[-1].items():
        for task in group:
            parents[-1][task] = stream
    return Architecture(tuple(tuple(row) for row in parents))


def reassigned_groups(routing: Sequence[Sequence[int]]) -> int:
    """How many groups ``routing_to_architecture`` had to move off the candidate they chose."""
    return _stream_assignment(check_routing(routing))[1]


class BmtasNet(TreeSearchNet):
    """BMTAS's supergraph on the anchor: ``logits[l, t, s]`` is task ``t``'s unnormalised log probability of
    candidate ``s`` (stream ``s``'s block) in layer ``l``.

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
        resource: what the resource loss counts, ``"flops"`` (the paper's MAdds, counted as 2 FLOPs each) or
            ``"params"``.
    """

    kind = "bmtas"

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None,
                 resource: str = "flops") -> None:
        if resource not in RESOURCES:
            raise ValueError(f"resource must be one of {RESOURCES}, got {resource!r}")
        super().__init__(backbone, tasks, input_shape)
        if self.n_tasks > MAX_TASKS:
            raise ValueError(f"BMTAS's resource loss enumerates the Bell number of task groupings; {self.n_tasks} "
                             f"tasks are more than it can handle ({MAX_TASKS} at most)")
        self.resource = resource
        self._expected_cost: ExpectedCost | None = None

    def size_args(self) -> dict[str, str]:
        return {"resource": self.resource}

    def routing(self) -> list[list[int]]:
        """The argmax candidate of every task in every layer, ``routing[l][t]``."""
        return self.logits.detach().argmax(dim=-1).tolist()

    def architecture(self) -> Architecture:
        return routing_to_architecture(self.routing())

    def candidate_probabilities(self) -> Tensor:
        """``softmax(logits)``: ``(L, N tasks, N candidates)``."""
        return self.logits.softmax(dim=-1)

    def layer_costs(self) -> list[float]:
        """Cost of one candidate of every layer: the mean over the streams of the measured node costs (equal for
        every stream, since the streams are copies of one backbone)."""
        costs = self.node_costs()
        table = costs.node_flops if self.resource == "flops" else costs.node_params
        return [sum(row) / len(row) for row in table]

    def expected_cost(self) -> ExpectedCost:
        if self._expected_cost is None:
            self._expected_cost = ExpectedCost(self.n_tasks, self.layer_costs())
        return self._expected_cost

    def resource_loss(self, probs: Tensor | None = None) -> Tensor:
        """The expected encoder cost of the routing distribution over that of N separate encoders (1/N to 1).

        Args:
            probs: candidate probabilities ``(L, N, N)``; default ``softmax(logits)``. One-hot ones give the cost
                of one routing (``found_resource_loss``).
        """
        separate = self.n_tasks * sum(self.layer_costs())
        return self.expected_cost()(self.candidate_probabilities() if probs is None else probs) / separate

    def found_resource_loss(self) -> Tensor:
        """The resource loss of the found tree (the argmax routing): its encoder cost over N separate encoders."""
        one_hot = torch.nn.functional.one_hot(self.logits.detach().argmax(dim=-1), self.n_tasks)
        return self.resource_loss(one_hot.to(self.logits.dtype))

    def task_forward(self, x: Tensor, task: int, weights: Tensor) -> Tensor:
        """Task ``task``'s output when layer ``l``'s feature is ``sum_s weights[l, s] * block_(l, s)(previous)``.

        Args:
            x: input batch.
            task: the task (its head).
            weights: ``(L, N)`` mixing weights (one-hot: a fixed routing; soft: the search's relaxation).
        """
        path = [x]
        for layer in range(self.anchor.n_layers):
            outputs = torch.stack([self.anchor.node(layer, s)(path[-1]) for s in range(self.n_tasks)])
            path.append(torch.einsum("s,s...->...", weights[layer].to(outputs.dtype), outputs))
        return self.anchor.heads[task](path)

    def search_forward(self, x: Tensor, temperature: float, noise: Tensor | None = None,
                       uniform_share: float = 0.0) -> dict[str, Tensor]:
        """Every task's output through its own soft Gumbel-softmax sample of the supergraph (one forward per task).

        Args:
            x: input batch.
            temperature: Gumbel-softmax temperature.
            noise: standard Gumbel noise shaped like the logits (tests); default: drawn.
            uniform_share: the share of the uniform mixture in every task's weights (``(1 - share) * sample +
                share / N``), so that every candidate keeps training on every task.
        """
        _, soft = gumbel_samples(self.logits, temperature, noise=noise)
        if uniform_share:
            soft = (1 - uniform_share) * soft + uniform_share / soft.shape[-1]
        return {name: self.task_forward(x, t, soft[:, t]) for t, name in enumerate(self.task_names)}
