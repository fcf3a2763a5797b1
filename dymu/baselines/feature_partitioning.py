"""Feature partitioning (Newell, Jiang, Wang, Li and Deng, "Feature Partitioning for Efficient Multi-Task
Architectures"; seeds/002) on the shared network of DYMU's baselines.

Mapping to the paper:

- **Masks** (section 3): every task ``t`` has a binary channel mask per block; the shared network (one stream's L
  blocks, N heads: ``dymu.baselines.base.shared_network``) runs once per task, block ``l``'s output multiplied by
  task ``t``'s mask of layer ``l`` (``FeaturePartitionNet.task_forward``). The masks sit on the block outputs,
  and every block holds two or more layers, which is the paper's "masks are applied every other layer": a task
  with half the channels uses about half the network. Zeroed channels get no gradient from that task, so the
  paper's backward mask equals the forward one.
- **Parameterisation** (section 3.1, appendix A.1): a symmetric ``P`` in ``[0, 1]^(N x N)``: the diagonal is each
  task's share of the channels, the off-diagonal entries the pairwise overlap, remapped to feasible values
  (``refine_partition``: raw 0 is the least overlap the two shares allow, raw 1 the most). The masks of a
  layer with ``c`` channels realise ``c * P~`` (``masks_from_partition``): the paper's mixed integer program
  with slack, solved here over the channel counts of every subset of tasks (2^N - 1 integer variables,
  since permuting channels changes nothing) with ``scipy.optimize.milp``; a feasible ``P~`` is met to within
  one channel per entry.
- **Evaluation** (section 4.2): a candidate is scored by feature distillation (``distillation_score``): the last
  ``distill_layers`` blocks are replaced by fresh shared blocks (the backbone's own initialisation, as the paper
  starts them from the ImageNet weights the teachers started from), masked by the candidate, and trained for a
  few steps to reproduce the blocks' outputs of each task's single-task network (the anchor's streams, the
  teachers), alternating tasks with an MSE loss; the score is the scaled task loss on held-out batches when
  those blocks replace the teachers' (the paper measures "the updated model accuracy").
- **Search** (section 4.1, appendix A.2): random sampling (``P ~ U[0, 1]``) or evolutionary strategies (Mania et
  al.'s random search: ``directions`` random directions added to and subtracted from ``P``, a finite-difference
  gradient step of size ``step_size``, values clipped to ``[0, 1]``), both minimising the score plus an L2
  penalty on ``P``'s diagonal (``diag_penalty``, which sets the size). ``search_partition`` takes the number of
  candidate evaluations as its budget and returns the best candidate.
- **Final network**: the best ``P`` trained to convergence (``lightning_modules.feature_partitioning``), with
  BatchNorm statistics kept per task (appendix A.2), so inference does not depend on the batch.

Cost: the paper's measure of resource use is the channel share, a task with share ``d`` using about ``d`` of
the network; ``FeaturePartitionNet.cost`` applies it per block to the measured block costs: parameters of the
channels some task uses, FLOPs summed over the tasks' own passes (each task runs its own masked path).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dymu.anchor import AnchorNet, node_costs, use_batch_statistics
from dymu.backbones.base import Backbone, build_backbone
from dymu.baselines.base import BaselineModel, shared_network
from dymu.checkpoint import META_KEY, load_checkpoint
from dymu.tasks import Task, tasks_from_config

MAX_TASKS = 12
"""The mask program has one integer variable per non-empty subset of tasks (4,095 for 12 tasks)."""

PARTITION_KEY = "feature_partitioning"
"""Key, in the stage checkpoint's metadata, of the found partition (raw ``P``, ``P~`` and the channel shares)."""


def check_partition(p: Tensor | Sequence[Sequence[float]], n_tasks: int | None = None) -> Tensor:
    """``P`` as a float64 tensor: square, symmetric, entries in ``[0, 1]``."""
    t = torch.as_tensor(p, dtype=torch.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1] or (n_tasks is not None and t.shape[0] != n_tasks):
        raise ValueError(f"a partition matrix P must be {n_tasks or 'N'} x {n_tasks or 'N'}, got shape "
                         f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or t.min() < 0 or t.max() > 1:
        raise ValueError("the entries of a partition matrix P must lie in [0, 1]")
    if not torch.allclose(t, t.T):
        raise ValueError("a partition matrix P must be symmetric (P[i, j] is the overlap of tasks i and j)")
    return t


def refine_partition(p: Tensor | Sequence[Sequence[float]]) -> Tensor:
    """``P~`` of appendix A.1: the diagonal kept, every off-diagonal ``P[i, j]`` mapped from ``[0, 1]`` onto
    ``[max(0, P_ii + P_jj - 1), min(P_ii, P_jj)]``, the overlaps two shares allow."""
    t = check_partition(p)
    d = torch.diagonal(t)[:, None].expand_as(t)
    p_min = (d + d.T - 1).clamp(min=0)
    p_max = torch.minimum(d, d.T)
    eye = torch.eye(t.shape[0], dtype=t.dtype)
    return t * eye + (t * (p_max - p_min) + p_min) * (1 - eye)


def partition_of_masks(masks: Tensor) -> Tensor:
    """``P = M^T M / c`` for masks ``(N, c)`` (task ``i``'s share on the diagonal, overlaps off it)."""
    m = masks.to(torch.float64)
    return m @ m.T / m.shape[1]


def masks_from_partition(constraints: Tensor | Sequence[Sequence[float]], channels: int) -> Tensor:
    """Binary masks ``(N, channels)`` whose shares and overlaps are ``channels * P~`` as nearly as integers allow.

    An integer program over the number of channels of every non-empty subset of tasks (the channels used by
    exactly those tasks): minimise the total absolute error of the N shares and N (N - 1) / 2 overlaps, with at
    most ``channels`` channels in all. Channels are then laid out subset by subset (a fixed order), so the
    result is deterministic.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    p = check_partition(constraints)
    n = p.shape[0]
    if n > MAX_TASKS:
        raise ValueError(f"the mask program has 2^N - 1 variables: N = {n} is more than {MAX_TASKS}")
    if channels < 1:
        raise ValueError(f"a layer needs at least one channel, got {channels}")
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    n_sub, n_pair = len(subsets), len(pairs)
    # variables: subset counts x_S, then errors e+ and e- per (i, j): sum_{S >= {i, j}} x_S - e+ + e- = c P~_ij
    a = np.zeros((n_pair + 1, n_sub + 2 * n_pair))
    for row, (i, j) in enumerate(pairs):
        a[row, :n_sub] = [1.0 if i in s and j in s else 0.0 for s in subsets]
        a[row, n_sub + row], a[row, n_sub + n_pair + row] = -1.0, 1.0
    a[n_pair, :n_sub] = 1.0
    target = np.array([channels * float(p[i, j]) for i, j in pairs])
    lower = np.concatenate([target, [0.0]])
    upper = np.concatenate([target, [float(channels)]])
    cost = np.concatenate([np.zeros(n_sub), np.ones(2 * n_pair)])
    integrality = np.concatenate([np.ones(n_sub), np.zeros(2 * n_pair)])
    result = milp(cost, constraints=LinearConstraint(a, lower, upper), integrality=integrality,
                  bounds=Bounds(0, np.inf))
    if result.x is None:
        raise RuntimeError(f"the mask program found no solution ({result.message})")
    counts = np.rint(result.x[:n_sub]).astype(int)
    masks = torch.zeros(n, channels, dtype=torch.bool)
    start = 0
    for subset, count in zip(subsets, counts):
        masks[list(subset), start:start + count] = True
        start += count
    return masks


def _channel_shape(mask: Tensor, feature: Tensor) -> Tensor:
    return mask.view(1, -1, *([1] * (feature.ndim - 2)))


class _BufferSet(nn.Module):
    """Copies of named buffers (names with dots are not valid buffer names, so they are numbered)."""

    def __init__(self, buffers: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.names = list(buffers)
        for i, value in enumerate(buffers.values()):
            self.register_buffer(f"b{i}", value.detach().clone())

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"b{i}") for i, name in enumerate(self.names)}


class FeaturePartitionNet(BaselineModel):
    """The shared network with per-task channel masks on every block output and per-task BatchNorm statistics.

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
        partition: the raw ``P`` (N x N, symmetric, in ``[0, 1]``); default: all ones (every task uses every
            channel: the plain shared network).
        channels: the channels of every block's output; measured with a forward pass (needs ``input_shape``)
            when not given.
    """

    kind = "feature_partitioning"

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None,
                 partition: Sequence[Sequence[float]] | None = None, channels: Sequence[int] | None = None) -> None:
        super().__init__(backbone, tasks, input_shape)
        n = len(tasks)
        self.net = shared_network(backbone, tasks)
        self.n_layers = len(self.net.blocks)
        if channels is None:
            if self.input_shape is None:
                raise ValueError("FeaturePartitionNet needs channels or input_shape (to measure the channels)")
            channels = block_channels(self.net, self.input_shape)
        if len(channels) != self.n_layers:
            raise ValueError(f"channels lists {len(channels)} layers, the backbone has {self.n_layers}")
        self.channels = [int(c) for c in channels]
        for layer, c in enumerate(self.channels):
            self.register_buffer(f"mask_{layer}", torch.ones(n, c))
        self.register_buffer("constraints", torch.ones(n, n, dtype=torch.float64))
        self.partition = [[1.0] * n for _ in range(n)]
        self.set_partition(partition if partition is not None else self.partition)
        # per-task BatchNorm statistics of every block (the paper's separate statistics per task)
        self.task_statistics = nn.ModuleList([
            nn.ModuleList([_BufferSet(dict(self.net.node(layer, 0).named_buffers())) for layer in range(self.n_layers)])
            for _ in range(n)])

    def size_args(self) -> dict[str, Any]:
        return {"partition": self.partition, "channels": self.channels}

    def set_partition(self, partition: Tensor | Sequence[Sequence[float]]) -> None:
        """Set the raw ``P`` and derive ``P~`` and the masks of every layer from it."""
        raw = check_partition(partition, self.n_tasks)
        self.partition = raw.tolist()
        refined = refine_partition(raw)
        self.constraints.copy_(refined)
        for layer, c in enumerate(self.channels):
            self.masks(layer).copy_(masks_from_partition(refined, c).float())

    def masks(self, layer: int) -> Tensor:
        """``(N, channels)`` 0/1 masks of block ``layer``'s output."""
        return getattr(self, f"mask_{layer}")

    def channel_shares(self) -> Tensor:
        """``(L, N)``: the share of block ``l``'s channels that task ``t`` uses."""
        return torch.stack([self.masks(layer).mean(dim=1) for layer in range(self.n_layers)])

    def task_forward(self, x: Tensor, task: int) -> Tensor:
        """Task ``task``'s output: every block's output masked by the task's mask, its own BatchNorm statistics."""
        path = [x]
        for layer in range(self.n_layers):
            buffers = self.task_statistics[task][layer].as_dict()  # type: ignore[index]
            y = functional_call(self.net.node(layer, 0), buffers, (path[-1],))
            path.append(y * _channel_shape(self.masks(layer)[task], y).to(y.dtype))
        return self.net.heads[task](path)

    def forward(self, x: Tensor, r: Any = None, c: Any = None) -> dict[str, Tensor]:
        """Every task's output (one masked pass per task); ``r`` and ``c`` are ignored."""
        return {name: self.task_forward(x, t) for t, name in enumerate(self.task_names)}

    def inference_network(self) -> nn.Module:
        return self

    def cost(self, r: Any = None, c: Any = None) -> dict[str, int]:
        """``params``: the blocks' parameters times the share of channels some task uses, plus the heads;
        ``flops``: the blocks' FLOPs times the sum of the tasks' shares (each task runs its own masked pass),
        plus the heads (module docstring). Block costs are measured with the flop counter."""
        if self.input_shape is None:
            raise RuntimeError("cost needs the input shape: build the model with input_shape=...")
        anchor = AnchorNet(build_backbone(self.backbone_config), tasks_from_config(self.task_configs))
        costs = node_costs(anchor, self.input_shape)  # every stream is this network's blocks; row entry 0 is used
        used = [float(self.masks(layer).amax(dim=0).mean()) for layer in range(self.n_layers)]
        shares = self.channel_shares().sum(dim=1).tolist()
        params = sum(costs.node_params[k][0] * used[k] for k in range(self.n_layers)) + sum(costs.head_params)
        flops = sum(costs.node_flops[k][0] * shares[k] for k in range(self.n_layers)) + sum(costs.head_flops)
        return {"params": round(params), "flops": round(flops)}


@torch.no_grad()
def block_channels(net: nn.Module, input_shape: Sequence[int]) -> list[int]:
    """The channel count (dimension 1) of every block output of a shared network."""
    was_training = net.training
    net.eval()
    y = torch.zeros(2, *input_shape)
    channels = []
    for layer in range(len(net.blocks)):  # type: ignore[arg-type]
        y = net.node(layer, 0)(y)  # type: ignore[operator]
        channels.append(int(y.shape[1]))
    net.train(was_training)
    return channels


def partition_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """The found partition a feature-partitioning checkpoint stores: ``partition`` (raw ``P``), ``constraints``
    (``P~``) and ``channel_shares`` (per layer and task)."""
    meta = load_checkpoint(path)[META_KEY]
    if PARTITION_KEY not in meta:
        raise ValueError(f"{path} holds no feature partitioning (stage {meta.get('stage')!r})")
    return dict(meta[PARTITION_KEY])


# ---------------------------------------------------------------------------------------------- the search


def distillation_score(anchor: AnchorNet, backbone: Backbone, partition: Tensor, train_batches: Sequence[Tensor],
                       eval_batches: Sequence[Mapping[str, Tensor]], tasks: Sequence[Task], scales: Tensor,
                       steps: int = 50, lr: float = 1e-3, distill_layers: int = 1, seed: int = 0) -> float:
    """Score a raw ``P`` by short feature distillation from the anchor's streams (lower is better).

    The last ``distill_layers`` blocks are replaced by one fresh shared copy (``backbone.make_blocks()`` under
    ``seed``, so every candidate starts from the same weights) whose block outputs are masked per task. For
    ``steps`` steps (the tasks in turn, a batch each, Adam, the rate divided by 10 after two thirds) the masked
    shared blocks learn to reproduce the teacher stream's block outputs (MSE) from the teacher's features below
    them. Score: ``sum_t w_t L_t`` of the teachers with their last blocks replaced, on ``eval_batches``.

    Args:
        anchor: the single-task teachers (its streams), frozen, in eval mode.
        backbone: the anchor's backbone (fresh blocks for the student).
        partition: the raw ``P``.
        train_batches: input batches for the distillation (cycled).
        eval_batches: batches with targets for the score.
        tasks, scales: the tasks and their loss scales ``w_t``.
        steps, lr: distillation steps and Adam learning rate.
        distill_layers: how many of the last blocks are replaced (the paper distils the last four layers).
        seed: seeds the student's initial weights.
    """
    n, n_layers = anchor.n_tasks, anchor.n_layers
    if not 1 <= distill_layers <= n_layers:
        raise ValueError(f"distill_layers must be in 1..{n_layers}, got {distill_layers}")
    if steps < 0 or not train_batches or not eval_batches:
        raise ValueError("distillation needs steps >= 0 and at least one training and one evaluation batch")
    first = n_layers - distill_layers
    refined = refine_partition(partition)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = nn.ModuleList(backbone.make_blocks()[first:])
    device = next(anchor.parameters()).device
    student.to(device)
    use_batch_statistics(student)  # a short proxy: no per-task statistics to estimate
    masks = []  # (N, channels) per student block
    with torch.no_grad():
        probe = _teacher_path(anchor, 0, train_batches[0][:2].to(device), first)[-1]
        for block in student:
            probe = block(probe)
            masks.append(masks_from_partition(refined, probe.shape[1]).to(device))
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [max(1, (2 * steps) // 3)], gamma=0.1)
    student.train()
    for step in range(steps):
        task = step % n
        x = train_batches[(step // n) % len(train_batches)].to(device)
        with torch.no_grad():
            teacher = _teacher_path(anchor, task, x, n_layers)
        y, loss = teacher[first], x.new_zeros(())
        for k, block in enumerate(student):
            y = block(y)
            y = y * _channel_shape(masks[k][task], y).to(y.dtype)
            loss = loss + F.mse_loss(y, teacher[first + 1 + k])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    student.eval()
    total = 0.0
    with torch.no_grad():
        for batch in eval_batches:
            x = batch["image"].to(device)
            for t, task in enumerate(tasks):
                path = _teacher_path(anchor, t, x, first)
                for k, block in enumerate(student):
                    y = block(path[-1])
                    path.append(y * _channel_shape(masks[k][t], y).to(y.dtype))
                target = batch[task.name].to(device)
                total += float(scales[t]) * float(task.loss(anchor.heads[t](path), target))
    return total / len(eval_batches)


def _teacher_path(anchor: AnchorNet, task: int, x: Tensor, depth: int) -> list[Tensor]:
    """``[x, y_0, ..., y_(depth-1)]`` of stream ``task``."""
    path = [x]
    for layer in range(depth):
        path.append(anchor.node(layer, task)(path[-1]))
    return path


def partition_vector_size(n: int) -> int:
    return n * (n + 1) // 2


def vector_to_partition(theta: Tensor, n: int) -> Tensor:
    """The symmetric ``P`` whose upper triangle (diagonal included, row by row) is ``theta``."""
    rows, cols = torch.triu_indices(n, n)
    p = torch.zeros(n, n, dtype=torch.float64)
    p[rows, cols] = theta.to(torch.float64)
    p[cols, rows] = theta.to(torch.float64)
    return p


@dataclass
class SearchResult:
    """The best candidate of a search and every evaluation (``partition`` raw ``P``, ``score``, ``objective``)."""

    partition: Tensor
    objective: float
    history: list[dict[str, Any]] = field(default_factory=list)


def search_partition(score: Callable[[Tensor], float], n_tasks: int, budget: int, method: str = "es",
                     diag_penalty: float = 1e-3, directions: int = 16, step_size: float = 0.1, noise: float = 0.05,
                     init: Tensor | Sequence[Sequence[float]] | None = None, seed: int = 0,
                     callback: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Search the raw ``P`` minimising ``score(P) + diag_penalty * ||diag(P)||^2`` with ``budget`` evaluations.

    Args:
        score: a candidate's score (lower is better), e.g. ``distillation_score`` bound to its data.
        n_tasks: N.
        budget: the number of candidates scored.
        method: ``"random"`` (``P ~ U[0, 1]``, symmetric) or ``"es"`` (evolutionary strategies from ``init``,
            default every entry 0.5: ``directions`` Gaussian directions scaled by ``noise`` added and subtracted,
            the finite differences normalised by their standard deviation, a step of ``step_size``, clipped to
            ``[0, 1]``; fewer directions if the budget is smaller than two per direction).
        diag_penalty: the L2 penalty on the diagonal (larger: fewer channels per task).
        seed: seeds the samples.
        callback: called with every evaluation's record (for logging).

    Returns:
        The best evaluated candidate, its objective and the history of evaluations in order.
    """
    if method not in ("random", "es"):
        raise ValueError(f"method must be 'random' or 'es', got {method!r}")
    if budget < 1 or directions < 1 or step_size <= 0 or noise <= 0:
        raise ValueError(f"need budget >= 1, directions >= 1, step_size > 0 and noise > 0; got {budget}, "
                         f"{directions}, {step_size}, {noise}")
    generator = torch.Generator().manual_seed(seed)
    size = partition_vector_size(n_tasks)
    rows, cols = torch.triu_indices(n_tasks, n_tasks)
    diagonal = rows == cols
    history: list[dict[str, Any]] = []

    def evaluate(theta: Tensor) -> float:
        p = vector_to_partition(theta, n_tasks)
        value = float(score(p))
        objective = value + diag_penalty * float((theta[diagonal] ** 2).sum())
        record = {"evaluation": len(history), "partition": p.tolist(), "score": value, "objective": objective,
                  "mean_share": float(theta[diagonal].mean())}
        history.append(record)
        if callback is not None:
            callback(record)
        return objective

    if method == "random":
        for _ in range(budget):
            evaluate(torch.rand(size, generator=generator, dtype=torch.float64))
    else:
        theta = (torch.full((size,), 0.5, dtype=torch.float64) if init is None
                 else check_partition(init, n_tasks)[rows, cols])
        k = min(directions, max(1, budget // 2))
        while len(history) + 2 * k <= budget:
            deltas = torch.randn(k, size, generator=generator, dtype=torch.float64)
            plus = [evaluate((theta + noise * d).clamp(0, 1)) for d in deltas]
            minus = [evaluate((theta - noise * d).clamp(0, 1)) for d in deltas]
            values = torch.tensor(plus + minus, dtype=torch.float64)
            spread = float(values.std()) if len(values) > 1 else 0.0
            diffs = torch.tensor(plus, dtype=torch.float64) - torch.tensor(minus, dtype=torch.float64)
            gradient = (diffs[:, None] * deltas).sum(0) / (k * (spread if spread > 0 else 1.0))
            theta = (theta - step_size * gradient).clamp(0, 1)
        if not history:
            evaluate(theta)
    best = min(history, key=lambda r: r["objective"])
    return SearchResult(torch.tensor(best["partition"], dtype=torch.float64), best["objective"], history)


def first_batches(loader: Iterable[Mapping[str, Tensor]], count: int) -> list[dict[str, Tensor]]:
    """The first ``count`` batches of a loader (fewer if it has fewer), as plain dicts of tensors."""
    out = []
    for batch in loader:
        out.append({k: v for k, v in batch.items() if isinstance(v, Tensor)})
        if len(out) == count:
            break
    if not out:
        raise ValueError("the data loader gave no batch")
    return out
