"""The measured controller: the tree of a preference chosen from measured path losses, and budgeted search.

With the anchor frozen and its BatchNorms on running statistics, the output of task ``t`` in a tree depends
only on the sequence of nodes on its own path (``Architecture.path``): a shared node computes what it would
compute alone. So the loss of any tree without adaptation is the sum of per-task losses of paths, and for a
small search space (``N ** L`` paths) every path's loss can be measured once on validation batches
(``measure_path_losses``). From that table the controller picks, for a preference ``(r, c)``, the tree

    argmin_T  sum_t r_t * L_t(path_t(T)) / L_t(anchor)  +  mu(c) * cost(T) / cost(anchor)
    subject to cost(T) / cost(anchor) <= B (an optional budget),

with ``mu(c) = lambda * (gamma + (1 - gamma) * c)``: ``lambda`` is calibrated on the anchor's measurements
(``calibrate_trade_off``) so that the uniform preference's sharing steps break even across ``c``, the last one
(down to one stream) at ``c = 0.9``; ``gamma`` (``base_frugality``) is the small price that lets the branches of
tasks that barely matter for ``r`` merge at ``c = 0``, as the paper's inactive loss does. The minimum is
exact: the trees are enumerated (``enumerate_trees``) when there are at most ``EXACT_TREE_LIMIT`` of them, else
found by a local search (``local_search``) whose optimality gap is measured in docs/controllability.md.

The same search finds the most probable tree of the edge hypernet's distribution within a budget
(``most_probable_tree``): the objective is then minus the log-probability of the used edges.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dymu.search_space import Architecture

EXACT_TREE_LIMIT = 2_000_000
"""Largest number of trees searched by enumeration; larger spaces use ``local_search``."""

MAX_PATHS = 4096
"""Largest ``N ** L`` for which every path's loss is measured (the quickstart: 81, the regression data: 1296)."""

COST_METRICS = ("params", "flops")
TIE_TOLERANCE = 1e-6
"""Objectives within this relative distance of the minimum are ties, broken by the lower cost then the lower
tree index: float noise of the measured losses (another CPU, another thread count) cannot flip a choice
between two trees that are equally good."""


# ---------------------------------------------------------------------------------------------------------
# trees as tensors


def path_index(streams: Sequence[int], n_tasks: int) -> int:
    """Row of a path in the path-loss table: ``sum_k streams[k] * N ** k`` (``streams`` from layer 0 up)."""
    return sum(int(s) * n_tasks ** k for k, s in enumerate(streams))


def tree_paths(parents: Tensor) -> Tensor:
    """Path index of every task for a batch of parent tables ``(M, L, N)`` -> ``(M, N)`` (``path_index``)."""
    m, n_layers, n = parents.shape
    child = torch.arange(n, device=parents.device).expand(m, n)
    index = torch.zeros(m, n, dtype=torch.long, device=parents.device)
    for k in reversed(range(n_layers)):
        child = torch.gather(parents[:, k], 1, child)
        index = index + child * n ** k
    return index


def tree_used(parents: Tensor) -> Tensor:
    """Used block nodes ``(M, L, N)`` (bool) of a batch of parent tables ``(M, L, N)``."""
    m, n_layers, n = parents.shape
    used = torch.zeros(m, n_layers, n, dtype=torch.bool, device=parents.device)
    children = torch.ones(m, n, dtype=torch.bool, device=parents.device)  # the heads
    for k in reversed(range(n_layers)):
        onehot = torch.nn.functional.one_hot(parents[:, k], n).bool() & children.unsqueeze(-1)
        used[:, k] = onehot.any(dim=1)
        children = used[:, k]
    return used


def count_trees(n_tasks: int, n_layers: int) -> int:
    """The number of distinct trees (parent choices of the used children only): ``f(L, N)`` with
    ``f(0, u) = 1`` and ``f(m, u) = sum_v S(u, v) * N! / (N - v)! * f(m - 1, v)`` (u used children choose v
    distinct parents; S is the Stirling number of the second kind)."""
    @functools.cache
    def stirling(u: int, v: int) -> int:
        if u == v:
            return 1
        if v == 0 or v > u:
            return 0
        return v * stirling(u - 1, v) + stirling(u - 1, v - 1)

    @functools.cache
    def f(m: int, u: int) -> int:
        if m == 0:
            return 1
        return sum(stirling(u, v) * math.perm(n_tasks, v) * f(m - 1, v) for v in range(1, u + 1))

    return f(n_layers, n_tasks)


@functools.lru_cache(maxsize=8)
def enumerate_trees(n_tasks: int, n_layers: int) -> Tensor:
    """Every distinct tree as a parent table, ``(T, L, N)`` long; an unused child keeps its own stream
    (``parents[k][j] = j``), so each tree appears once. Raises if there are more than ``EXACT_TREE_LIMIT``."""
    total = count_trees(n_tasks, n_layers)
    if total > EXACT_TREE_LIMIT:
        raise ValueError(f"{total} trees for N={n_tasks}, L={n_layers}: too many to enumerate "
                         f"(limit {EXACT_TREE_LIMIT}); use local_search")
    # build from the heads down: at each row, the used children choose among the N parents
    partial: list[tuple[list[tuple[int, ...]], tuple[int, ...]]] = [([], tuple(range(n_tasks)))]
    for _ in reversed(range(n_layers)):
        nxt = []
        for done, children in partial:
            for choice in itertools.product(range(n_tasks), repeat=len(children)):
                row = list(range(n_tasks))
                for j, p in zip(children, choice):
                    row[j] = p
                nxt.append(([tuple(row), *done], tuple(sorted(set(choice)))))
        partial = nxt
    out = torch.tensor([done for done, _ in partial], dtype=torch.long)
    if out.shape[0] != total:  # the enumeration and the count are two derivations of one number
        raise RuntimeError(f"enumerated {out.shape[0]} trees for N={n_tasks}, L={n_layers}, counted {total}")
    return out


class Trees:
    """A batch of parent tables ``(M, L, N)`` with their paths, used nodes and used children computed once."""

    def __init__(self, parents: Tensor) -> None:
        self.parents = parents

    def __len__(self) -> int:
        return self.parents.shape[0]

    @functools.cached_property
    def paths(self) -> Tensor:
        return tree_paths(self.parents)

    @functools.cached_property
    def used(self) -> Tensor:
        return tree_used(self.parents)

    @functools.cached_property
    def children(self) -> Tensor:
        return torch.cat([self.used[:, 1:], torch.ones_like(self.used[:, :1])], dim=1)

    def __getitem__(self, index: int) -> Tensor:
        return self.parents[index]


@functools.lru_cache(maxsize=8)
def all_trees(n_tasks: int, n_layers: int) -> Trees:
    """``enumerate_trees`` with paths and used nodes computed once per process."""
    return Trees(enumerate_trees(n_tasks, n_layers))


def tree_costs(trees: Trees, node_cost: Tensor, head_cost: float) -> Tensor:
    """Cost of each tree ``(M,)``: its used nodes' ``node_cost[k, i]`` plus the heads'."""
    return (trees.used.to(node_cost.dtype) * node_cost).sum(dim=(1, 2)) + head_cost


def as_parents(architecture: Architecture) -> Tensor:
    return torch.tensor(architecture.parents, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------
# the search


def pick(objective: Tensor, cost: Tensor, feasible: Tensor) -> int:
    """Index of the minimum of ``objective`` among ``feasible`` entries; ties (``TIE_TOLERANCE``) go to the
    lower cost, then the lower index."""
    if not bool(feasible.any()):
        raise ValueError("no tree fits the constraint")
    obj = torch.where(feasible, objective.double(), torch.full_like(objective, math.inf, dtype=torch.float64))
    best = obj.min()
    tie = feasible & (obj <= best + TIE_TOLERANCE * max(1.0, abs(float(best))))
    cheapest = torch.where(tie, cost.double(), torch.full_like(obj, math.inf)).min()
    candidates = tie & (cost.double() <= cheapest + 1e-9 * max(1.0, abs(float(cheapest))))
    return int(torch.nonzero(candidates)[0, 0])


def neighbours(parents: Tensor) -> Tensor:
    """Every parent table that differs from ``parents`` ``(L, N)`` in one choice, ``(L * N * N, L, N)``
    (the table itself included)."""
    n_layers, n = parents.shape
    out = parents.unsqueeze(0).repeat(n_layers * n * n, 1, 1)
    k, j, i = torch.meshgrid(torch.arange(n_layers), torch.arange(n), torch.arange(n), indexing="ij")
    out[torch.arange(out.shape[0]), k.flatten(), j.flatten()] = i.flatten()
    return out


def pair_neighbours(parents: Tensor) -> Tensor:
    """Every parent table that differs from ``parents`` ``(L, N)`` in two choices of two different children,
    ``(P, L, N)``: the moves a single change cannot reach through a worse tree (e.g. a task leaving a stream
    and the stream's own child following it)."""
    n_layers, n = parents.shape
    k, j, i = (t.flatten() for t in torch.meshgrid(torch.arange(n_layers), torch.arange(n), torch.arange(n),
                                                    indexing="ij"))
    moves = torch.nonzero(i != parents[k, j])[:, 0]  # real changes only
    a, b = torch.triu_indices(len(moves), len(moves), offset=1)
    a, b = moves[a], moves[b]
    keep = (k[a] != k[b]) | (j[a] != j[b])  # two different children
    a, b = a[keep], b[keep]
    out = parents.unsqueeze(0).repeat(len(a), 1, 1)
    rows = torch.arange(len(a))
    out[rows, k[a], j[a]] = i[a]
    out[rows, k[b], j[b]] = i[b]
    return out


Objective = Callable[[Trees], Tensor]


def descend(objective: Objective, cost: Objective, start: Tensor, budget: float | None,
            neighbourhoods: Sequence[Callable[[Tensor], Tensor]], max_rounds: int = 200) -> tuple[Tensor, float]:
    """Steepest descent from ``start`` ``(L, N)``: each round takes the best feasible tree of the first
    neighbourhood that improves on the current one; stops when none does. Returns the tree and its objective."""
    current = start
    here = float(objective(Trees(current.unsqueeze(0)))[0])
    for _ in range(max_rounds):
        moved = False
        for neighbourhood in neighbourhoods:
            cand = Trees(neighbourhood(current))
            if len(cand) == 0:
                continue
            values, costs = objective(cand), cost(cand)
            feasible = costs <= budget if budget is not None else torch.ones_like(costs, dtype=torch.bool)
            if not bool(feasible.any()):
                continue
            j = pick(values, costs, feasible)
            if float(values[j]) < here - TIE_TOLERANCE * max(1.0, abs(here)):
                current, here, moved = cand[j], float(values[j]), True
                break
        if not moved:
            break
    return current, here


def local_search(objective: Objective, cost: Objective, starts: Tensor, budget: float | None = None,
                 max_rounds: int = 200) -> Tensor:
    """The best tree ``(L, N)`` found by steepest descent from each start ``(S, L, N)`` that fits
    ``cost <= budget``, over single parent changes and, where none improves, over pairs of changes of two children
    (the moves a single change cannot reach without passing a worse tree). ``objective`` and ``cost`` map
    ``Trees`` of M trees to ``(M,)``."""
    best_tree, best_value = None, math.inf
    for start in starts:
        if budget is not None and float(cost(Trees(start.unsqueeze(0)))[0]) > budget:
            continue
        tree, value = descend(objective, cost, start, budget, (neighbours, pair_neighbours), max_rounds)
        if best_tree is None or value < best_value - TIE_TOLERANCE * max(1.0, abs(best_value)):
            best_tree, best_value = tree, value
    if best_tree is None:
        raise ValueError("no start of the local search fits the budget")
    return best_tree


def search_starts(n_tasks: int, n_layers: int, extra: Iterable[Tensor] = ()) -> Tensor:
    """The local search's starts: the anchor, each one-stream tree, and ``extra`` trees."""
    trees = [as_parents(Architecture.anchor(n_tasks, n_layers))]
    trees += [as_parents(Architecture.shared(n_tasks, n_layers, s)) for s in range(n_tasks)]
    trees += [t.long() for t in extra]
    return torch.stack(trees)


def enumerable(n_tasks: int, n_layers: int) -> bool:
    """Whether the trees of N tasks and L layers are few enough to enumerate (``EXACT_TREE_LIMIT``)."""
    return count_trees(n_tasks, n_layers) <= EXACT_TREE_LIMIT


def minimize_tree(objective: Objective, cost: Objective, n_tasks: int,
                  n_layers: int, budget: float | None = None, method: str = "auto",
                  starts: Iterable[Tensor] = ()) -> Architecture:
    """The tree minimising ``objective`` with ``cost <= budget``: exact over ``enumerate_trees`` (``method``
    ``"exact"``, or ``"auto"`` when the space is small enough), else ``local_search``."""
    if method not in ("auto", "exact", "local"):
        raise ValueError(f"search method must be 'auto', 'exact' or 'local', got {method!r}")
    if method == "exact" or (method == "auto" and enumerable(n_tasks, n_layers)):
        trees = all_trees(n_tasks, n_layers)
        costs = cost(trees)
        feasible = costs <= budget if budget is not None else torch.ones_like(costs, dtype=torch.bool)
        best = trees[pick(objective(trees), costs, feasible)]
    else:
        best = local_search(objective, cost, search_starts(n_tasks, n_layers, starts), budget)
        # unused children keep their own stream, as in the enumeration: one parent table per tree
        used = Trees(best.unsqueeze(0)).children[0]
        best = torch.where(used, best, torch.arange(n_tasks).expand_as(best))
    return Architecture(tuple(tuple(row) for row in best.tolist()))


# ---------------------------------------------------------------------------------------------------------
# costs


@dataclass(frozen=True)
class CostModel:
    """Node and head costs as fractions of the anchor's, for one metric (``params`` or ``flops``)."""

    node: Tensor  # (L, N)
    heads: float
    metric: str

    @classmethod
    def create(cls, node_costs: Any, metric: str = "params") -> CostModel:
        """From ``dymu.anchor.NodeCosts``."""
        if metric not in COST_METRICS:
            raise ValueError(f"budget_metric must be one of {COST_METRICS}, got {metric!r}")
        node = torch.tensor(node_costs.node_params if metric == "params" else node_costs.node_flops,
                            dtype=torch.float64)
        heads = float(sum(node_costs.head_params if metric == "params" else node_costs.head_flops))
        total = float(node.sum()) + heads
        return cls(node / total, heads / total, metric)

    def __call__(self, trees: Trees) -> Tensor:
        return tree_costs(trees, self.node, self.heads)

    def floor(self) -> float:
        """The cheapest tree's cost: one stream (the cheapest one per layer) and the N heads."""
        return float(self.node.min(dim=1).values.sum()) + self.heads


def check_budget(budget: float | None, costs: CostModel) -> float | None:
    """A budget is a fraction of the anchor's cost in ``(0, 1]``, at least the cheapest tree's."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget must be a number, a fraction of the anchor's {costs.metric} (got {budget!r})")
    budget = float(budget)
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the anchor's {costs.metric} in (0, 1], got {budget}")
    floor = costs.floor()
    if budget < floor - 1e-12:
        raise ValueError(f"budget {budget} is below the cheapest tree (one stream and the heads: {floor:.4f} of "
                         f"the anchor's {costs.metric}); pass a budget >= {floor:.4f}")
    return budget + 1e-12


# ---------------------------------------------------------------------------------------------------------
# measuring path losses


@torch.no_grad()
def measure_path_losses(anchor: nn.Module, tasks: Sequence[Any], batches: Iterable[Mapping[str, Tensor]],
                        device: torch.device | str = "cpu", max_paths: int = MAX_PATHS) -> tuple[Tensor, Tensor]:
    """Support-weighted loss sums of every path for every task, ``(N ** L, N)`` float64, and the supports
    ``(N,)`` (``dymu.evaluation.task_loss_sums``'s convention: sums over DDP shards add up).

    Row ``path_index(s)`` holds the losses of task heads fed by the path of nodes ``(k, s[k])``. Prefixes are
    shared: layer k computes ``N ** (k + 1)`` nodes per batch.
    """
    from dymu.evaluation import batch_loss_sums, batch_supports

    n, n_layers = anchor.n_tasks, anchor.n_layers
    if n ** n_layers > max_paths:
        raise ValueError(f"measuring every path needs N ** L = {n}^{n_layers} = {n ** n_layers} paths, more than "
                         f"{max_paths}; use the Gumbel search (edge.model.search: gumbel) for this network")
    was_training = anchor.training
    anchor.eval()
    total = torch.zeros(n ** n_layers, n, dtype=torch.float64)
    support = torch.zeros(n, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        supports = batch_supports(list(tasks), batch)
        prefixes: dict[tuple[int, ...], list[Tensor]] = {(): [batch["image"]]}
        for k in range(n_layers):
            prefixes = {(*p, s): [*feats, anchor.node(k, s)(feats[-1])] for p, feats in prefixes.items()
                        for s in range(n)}
        for streams, feats in prefixes.items():
            outputs = {name: head(feats) for name, head in zip(anchor.task_names, anchor.heads)}
            total[path_index(streams, n)] += batch_loss_sums(lambda _x, o=outputs: o, batch, list(tasks), supports)
        support += supports
    anchor.train(was_training)
    return total, support


# ---------------------------------------------------------------------------------------------------------
# the controller


def anchor_path_rows(n_tasks: int, n_layers: int) -> list[int]:
    return [path_index([t] * n_layers, n_tasks) for t in range(n_tasks)]


def lagrangian_path(loss: Tensor, cost: Tensor) -> tuple[list[int], list[float]]:
    """The trees that minimise ``loss + mu * cost`` as ``mu`` grows from 0 (the lower convex hull of the
    points ``(cost, loss)``, from the most accurate tree to the cheapest) and the ``mu`` at which each next one
    takes over (its break-even). ``loss`` and ``cost`` ``(M,)`` over candidate trees."""
    loss, cost = loss.double(), cost.double()
    i = pick(loss, cost, torch.ones_like(loss, dtype=torch.bool))
    path, breaks = [i], []
    while True:
        cheaper = cost < cost[i] - 1e-12
        if not bool(cheaper.any()):
            return path, breaks
        slope = (loss - loss[i]) / (cost[i] - cost).clamp_min(1e-300)
        slope = torch.where(cheaper, slope, torch.full_like(slope, math.inf))
        best = slope.min()
        # among trees on the same line, go to the cheapest (the others are passed at the same mu)
        on_line = cheaper & (slope <= best + TIE_TOLERANCE * max(1.0, abs(float(best))))
        i = int(torch.nonzero(on_line & (cost == cost[on_line].min()))[0, 0])
        path.append(i)
        breaks.append(float(best))


def calibration_preferences(n_tasks: int, count: int = 32) -> list[Tensor]:
    """The calibration's preferences: the uniform one and ``count - 1`` draws ``r ~ Dirichlet(1)`` (fixed
    seed)."""
    rng = torch.Generator().manual_seed(20230196)
    draws = torch.distributions.Gamma(torch.ones(n_tasks, dtype=torch.float64), 1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=rng)))
        samples = draws.sample((count - 1,))
    return [torch.full((n_tasks,), 1.0 / n_tasks, dtype=torch.float64),
            *list(samples / samples.sum(dim=1, keepdim=True))]


MU_GRID = torch.logspace(-3, 2, 26, dtype=torch.float64)
"""The ``mu`` values at which a space too large to enumerate is solved to trace a Lagrangian path."""


def candidate_trees(task_loss: Objective, costs: CostModel, n_tasks: int, n_layers: int, method: str) -> Trees:
    """The trees a Lagrangian path is traced over: every tree when the space is enumerated, else the local
    search's solutions over ``MU_GRID``."""
    if method == "exact" or (method == "auto" and enumerable(n_tasks, n_layers)):
        return all_trees(n_tasks, n_layers)
    found = {}
    for mu in MU_GRID.tolist():
        arch = minimize_tree(lambda t, m=mu: task_loss(t) + m * costs(t), costs, n_tasks, n_layers, None, "local")
        found[arch.parents] = as_parents(arch)
    return Trees(torch.stack(list(found.values())))


def calibrate_trade_off(scaled_losses: Tensor, costs: CostModel, base_frugality: float,
                        floor_break_even: float = 0.9, method: str = "auto") -> dict[str, Any]:
    """``lambda`` such that the uniform preference's sharing steps spread over ``(0, 1)``: its last step, down
    to the cheapest tree, breaks even at ``c = floor_break_even``.

    For a preference, the trees that are optimal for some trade-off ``mu`` form a path from its most accurate
    tree to the cheapest (``lagrangian_path``); step i pays from ``mu_i`` on. With
    ``mu(c) = lambda * (gamma + (1 - gamma) c)`` its break-even ``c`` is ``(mu_i / lambda - gamma) / (1 - gamma)``.
    If the uniform preference's most accurate tree is already the cheapest (no step), the median step of the
    calibration preferences (``calibration_preferences``) breaks even at ``c = 0.5`` instead.

    Returns ``trade_off`` (lambda), the break-even ``c`` of every calibration preference's steps (quartiles) and
    of the uniform preference's, and the settings.
    """
    if not 0 < floor_break_even <= 1:
        raise ValueError(f"floor_break_even must be in (0, 1], got {floor_break_even}")
    n = scaled_losses.shape[1]
    n_layers = round(math.log(scaled_losses.shape[0], n)) if n > 1 else 1
    columns = torch.arange(n)
    exact = method == "exact" or (method == "auto" and enumerable(n, n_layers))
    prefs = calibration_preferences(n, 32 if exact else 8)  # the uniform one first; fewer where each path is searched
    steps: list[list[float]] = []
    for r in prefs:
        def task_loss(trees: Trees, r: Tensor = r) -> Tensor:
            return (scaled_losses[trees.paths, columns] * r).sum(dim=1)
        trees = candidate_trees(task_loss, costs, n, n_layers, method)
        steps.append(lagrangian_path(task_loss(trees), costs(trees))[1])
    every = torch.tensor([mu for s in steps for mu in s], dtype=torch.float64)
    if steps[0] and steps[0][-1] > 0:
        lam, rule = steps[0][-1] / (base_frugality + (1 - base_frugality) * floor_break_even), "uniform floor"
    else:
        median = float(torch.quantile(every, 0.5)) if every.numel() else 0.0
        if median <= 0:
            raise ValueError("calibration: no preference gains from a cheaper tree's lower loss, so no trade-off can be "
                             "calibrated; the anchor's streams are not specialised (train the anchor longer)")
        lam, rule = median / (base_frugality + (1 - base_frugality) * 0.5), "median"

    def break_even(mu: float) -> float:
        return (mu / lam - base_frugality) / (1 - base_frugality)

    quartiles = (torch.quantile(every, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
                 if every.numel() else [])
    return {"trade_off": lam, "rule": rule, "base_frugality": base_frugality, "cost_metric": costs.metric,
            "floor_break_even": floor_break_even, "preferences": len(prefs), "steps": int(every.numel()),
            "break_even_c_quartiles": [break_even(q) for q in quartiles],
            "uniform_break_even_c": [break_even(mu) for mu in steps[0]]}


class MeasuredController(nn.Module):
    """The tree of a preference from measured path losses (module docstring).

    Buffers (saved in the checkpoint): ``path_loss_sums`` ``(N ** L, N)`` and ``supports`` ``(N,)`` (the
    measurement), ``trade_off`` (lambda). Config: ``base_frugality`` (gamma), ``cost_metric``.
    """

    def __init__(self, n_tasks: int, n_layers: int, base_frugality: float = 0.1, cost_metric: str = "params",
                 search: str = "auto") -> None:
        super().__init__()
        if not 0 <= base_frugality < 1:
            raise ValueError(f"base_frugality must be in [0, 1), got {base_frugality}")
        if cost_metric not in COST_METRICS:
            raise ValueError(f"cost_metric must be one of {COST_METRICS}, got {cost_metric!r}")
        if n_tasks ** n_layers > MAX_PATHS:
            raise ValueError(f"the measured controller needs N ** L <= {MAX_PATHS} paths, this network has "
                             f"{n_tasks}^{n_layers}; use edge.model.search: gumbel")
        self.n_tasks, self.n_layers = n_tasks, n_layers
        self.base_frugality, self.cost_metric, self.search = float(base_frugality), cost_metric, search
        self.register_buffer("path_loss_sums", torch.zeros(n_tasks ** n_layers, n_tasks, dtype=torch.float64))
        self.register_buffer("supports", torch.zeros(n_tasks, dtype=torch.float64))
        self.register_buffer("trade_off", torch.tensor(1.0, dtype=torch.float64))

    def config(self) -> dict[str, Any]:
        return {"base_frugality": self.base_frugality, "cost_metric": self.cost_metric, "search": self.search}

    def set_measurement(self, sums: Tensor, supports: Tensor) -> None:
        if not bool((supports > 0).all()):
            raise ValueError(f"the path losses were measured on no valid target of some task (supports "
                             f"{supports.tolist()}); the validation set needs targets of every task")
        self.path_loss_sums.copy_(sums)
        self.supports.copy_(supports)

    def path_losses(self) -> Tensor:
        """Mean unscaled loss of every path for every task, ``(N ** L, N)``."""
        return self.path_loss_sums / self.supports.clamp_min(1e-300)

    def scaled_losses(self) -> Tensor:
        """Path losses over the anchor's own (task ``t``'s path through stream ``t`` everywhere): 1 for the
        anchor."""
        losses = self.path_losses()
        anchor = losses[anchor_path_rows(self.n_tasks, self.n_layers), torch.arange(self.n_tasks)]
        return losses / anchor.clamp_min(1e-300)

    def calibrate(self, node_costs: Any, floor_break_even: float = 0.9) -> dict[str, Any]:
        """Set ``trade_off`` (``calibrate_trade_off``) and return the calibration's record."""
        record = calibrate_trade_off(self.scaled_losses(), CostModel.create(node_costs, self.cost_metric),
                                     self.base_frugality, floor_break_even, self.search)
        self.trade_off.fill_(record["trade_off"])
        return record

    def frugality(self, c: float) -> float:
        """``mu(c) = lambda * (gamma + (1 - gamma) c)``."""
        return float(self.trade_off) * (self.base_frugality + (1 - self.base_frugality) * float(c))

    def task_objective(self, r: Tensor) -> Objective:
        """Trees -> their r-weighted scaled validation loss without adaptation (the anchor: 1)."""
        scaled = self.scaled_losses().cpu()
        weights = r.detach().to(torch.float64).cpu()
        columns = torch.arange(self.n_tasks)
        return lambda trees: (scaled[trees.paths, columns] * weights).sum(dim=1)

    def _exact_tables(self, costs: CostModel) -> tuple[Trees, Tensor, Tensor] | None:
        """Every tree, its per-task scaled losses ``(T, N)`` and its cost ``(T,)``, cached until the measurement
        changes; None when the space is searched locally."""
        if not (self.search == "exact" or (self.search == "auto" and enumerable(self.n_tasks, self.n_layers))):
            return None
        key = (self.path_loss_sums.data_ptr(), self.path_loss_sums._version, self.supports._version,
               costs.metric, tuple(costs.node.flatten().tolist()))
        cache = self.__dict__.get("_tables")
        if cache is None or cache[0] != key:
            trees = all_trees(self.n_tasks, self.n_layers)
            losses = self.scaled_losses().cpu()[trees.paths, torch.arange(self.n_tasks)]
            cache = (key, (trees, losses, costs(trees)))
            self.__dict__["_tables"] = cache
        return cache[1]

    def solve(self, r: Tensor, c: float, node_costs: Any, budget: float | None = None,
              budget_metric: str = "params") -> Architecture:
        """The tree for ``(r, c)`` (module docstring), within ``budget`` (a fraction of the anchor's
        ``budget_metric``) when given. Answers are cached by the exact query (a local search takes a while)."""
        weights = tuple(float(v) for v in r.detach().to(torch.float64).cpu().flatten().tolist())
        key = (weights, float(c), budget, budget_metric, self.path_loss_sums._version, self.supports._version,
               self.trade_off._version, float(self.trade_off), tuple(map(tuple, node_costs.node_params)),
               tuple(map(tuple, node_costs.node_flops)))
        cache: dict[Any, Architecture] = self.__dict__.setdefault("_solutions", {})
        if key not in cache:
            if len(cache) >= 100_000:
                cache.clear()
            cache[key] = self._solve(r, c, node_costs, budget, budget_metric)
        return cache[key]

    def _solve(self, r: Tensor, c: float, node_costs: Any, budget: float | None, budget_metric: str) -> Architecture:
        objective_cost = CostModel.create(node_costs, self.cost_metric)
        budget_cost = objective_cost if budget_metric == self.cost_metric else \
            CostModel.create(node_costs, budget_metric)
        budget = check_budget(budget, budget_cost)
        mu = self.frugality(c)
        tables = self._exact_tables(objective_cost)
        if tables is not None:
            trees, losses, cost = tables
            weights = r.detach().to(torch.float64).cpu()
            limit = cost if budget_cost is objective_cost else budget_cost(trees)
            feasible = limit <= budget if budget is not None else torch.ones_like(cost, dtype=torch.bool)
            best = trees[pick(losses @ weights + mu * cost, cost, feasible)]
            return Architecture(tuple(tuple(row) for row in best.tolist()))
        task = self.task_objective(r)
        return minimize_tree(lambda p: task(p) + mu * objective_cost(p), budget_cost, self.n_tasks,
                             self.n_layers, budget, self.search)

    def solve_many(self, r: Tensor, c: Tensor, node_costs: Any) -> Tensor:
        """Parent tables ``(G, L, N)`` of the trees for G preferences ``r`` ``(G, N)``, ``c`` ``(G,)`` (no
        budget), in one pass over the enumerated trees when the space allows (the edge stage's distillation)."""
        costs = CostModel.create(node_costs, self.cost_metric)
        tables = self._exact_tables(costs)
        if tables is None:
            return torch.stack([as_parents(self.solve(ri, float(ci), node_costs)) for ri, ci in zip(r, c)])
        trees, losses, cost = tables
        mu = torch.tensor([self.frugality(float(ci)) for ci in c], dtype=torch.float64)
        objective = losses @ r.detach().to(torch.float64).cpu().T + cost.unsqueeze(1) * mu  # (T, G)
        best = objective.min(dim=0).values
        tie = objective <= best + TIE_TOLERANCE * best.abs().clamp_min(1.0)
        tie_cost = torch.where(tie, cost.unsqueeze(1), torch.full_like(objective, math.inf))
        cheapest = tie_cost.min(dim=0).values
        chosen = tie & (tie_cost <= cheapest + 1e-9 * cheapest.abs().clamp_min(1.0))
        index = chosen.to(torch.int8).argmax(dim=0)  # the first (lowest) index among the cheapest ties
        return trees.parents[index]


def same_tree(a: Architecture, b: Architecture) -> bool:
    """Whether two architectures are the same tree (the choices of unused children aside)."""
    return a.used_nodes() == b.used_nodes() and all(a.path(t) == b.path(t) for t in range(a.n_tasks))


def most_probable_tree(logits: Tensor, node_costs: Any, budget: float | None = None,
                       budget_metric: str = "params", method: str = "auto") -> Architecture:
    """The most probable tree of the edge distribution ``softmax(logits)`` ``(L, N, N)`` whose cost is at
    most ``budget`` (a fraction of the anchor's ``budget_metric``). A tree's probability is the product of
    its used children's edge probabilities (the choices of unused children do not change the tree). Without
    a budget this is ``Architecture.from_logits``."""
    n_layers, n = logits.shape[0], logits.shape[1]
    costs = CostModel.create(node_costs, budget_metric)
    budget = check_budget(budget, costs)
    if budget is None:
        return Architecture.from_logits(logits)
    logp = torch.log_softmax(logits.detach().double().cpu(), dim=-1)

    def objective(trees: Trees) -> Tensor:
        parents = trees.parents
        chosen = logp.unsqueeze(0).expand(parents.shape[0], -1, -1, -1).gather(-1, parents.unsqueeze(-1))[..., 0]
        return -(chosen * trees.children.to(chosen.dtype)).sum(dim=(1, 2))

    start = as_parents(Architecture.from_logits(logits))
    return minimize_tree(objective, costs, n, n_layers, budget, method, starts=[start])
