"""K trials of a hypernet stage trained in one process, on one frozen anchor (issue 20, item 1).

A sweep's trials share the parent's anchor and differ in the hypernet stages' settings (``tau``, the lambdas,
the temperature schedule, the seed, the learning rate). Rather than K processes, each with its own copy of the
anchor and hundreds of small kernels per step, the K hypernets are stacked along a leading trial dimension
(``StackedHypernets``: one ``torch.vmap`` of ``torch.func.functional_call`` computes all K x G preferences'
outputs), the frozen anchor runs once for the K trials' concatenated batches (each sample routed by its own
trial's and group's Gumbel sample), and one optimizer step (``StackedAdam``, elementwise, each trial with its own
learning rate and moments) updates every trial.

Each trial stays what it would be alone: its own preferences (``EdgeTrial.preferences``, the edge stage's
``PreferenceSampler`` sequence for its seed), its own Gumbel noise (``gumbel_noise``, from a generator seeded by
its seed and the step), its own regularizer weights and temperature, its own optimizer state. The losses are
summed over trials for one backward; trial k's parameters receive exactly trial k's gradient, since nothing in
trial k's loss reads another trial's parameters. ``tests/test_batched_trials.py`` checks losses, gradients and
the parameters after several optimizer steps against K separate single-trial computations
(``dymu.training.edge_search_loss`` / ``weight_adaptation_loss`` with ``torch.optim.Adam``).

What the batching needs of the trials: one hypernet structure (the same ``embed_dim``, ``hidden``, ...), the same
number of preference groups and the same batch size (the stacked shapes), and the same optimizer class (Adam).
Everything numeric may differ per trial. Lightning is not used here; ``train_edge_trials`` and
``train_weight_trials`` are plain loops over the steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dymu.anchor import AnchorNet, batch_statistics
from dymu.preference import Preference, sample_training_preference
from dymu.regularizer import omega
from dymu.search_space import Architecture
from dymu.tasks import Task, preference_loss, task_losses
from dymu.training import Batch, batch_slice, group_slices, temperature_at

# ---------------------------------------------------------------------------------------------------------
# per-trial randomness


def draw_preferences(n_tasks: int, step: int, eta: float, groups: int, seed: int) -> list[Preference]:
    """The ``groups`` training preferences of ``step`` for a trial seeded ``seed``: the same sequence as the
    stage modules' ``PreferenceSampler(eta, groups, seed).draw(n_tasks, step)`` (a generator seeded by
    ``(seed, step)``, so a trial's preferences do not depend on the other trials, nor on a resume)."""
    rng = np.random.default_rng([seed, step])
    return [sample_training_preference(n_tasks, rng, eta=eta) for _ in range(groups)]


NOISE_STREAM = 0x67756D  # "gum": keeps the noise's seed sequence apart from the preferences' (seed, step)


def noise_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a trial's Gumbel noise at ``step``: seeded by ``(seed, step)`` through numpy's
    ``SeedSequence`` (independent streams for nearby seeds and steps; the same after a resume)."""
    state = np.random.SeedSequence([int(seed), int(step), NOISE_STREAM]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


ORDER_STREAM = 0x6F7264  # "ord": the batch order's seed sequence, apart from the noise's and the preferences'


def order_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of a trial's batch order in ``epoch`` (``seed_batch_order``): seeded by ``(seed, epoch)``."""
    state = np.random.SeedSequence([int(seed), int(epoch), ORDER_STREAM]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def seed_batch_order(loader: Any, seed: int, epoch: int) -> bool:
    """Make the shuffled training ``loader``'s order of ``epoch`` a function of ``(seed, epoch)``: its
    ``RandomSampler`` draws from ``order_generator(seed, epoch)`` instead of a seed taken from the global random
    state (set before the epoch's first batch; the sampler reads its generator when the epoch's iteration starts).
    A loader without a ``RandomSampler`` (sequential, or DDP's ``DistributedSampler``, which is seeded by the
    epoch already) is left as it is; returns whether the order was set."""
    from torch.utils.data import RandomSampler

    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, RandomSampler):
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, RandomSampler):
        return False
    sampler.generator = order_generator(seed, epoch)
    return True


def gumbel_noise(shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard Gumbel noise, drawn exactly as ``dymu.hypernets.gumbel_samples`` draws it (so passing it as
    ``noise=`` there gives the same samples as drawing inside with ``generator``)."""
    uniform = torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
    exponential = (-torch.log(uniform.clamp_min(1e-10))).clamp_min(1e-10)
    return -torch.log(exponential)


# ---------------------------------------------------------------------------------------------------------
# stacked hypernets and the optimizer


class StackedHypernets(nn.Module):
    """K hypernets of one structure as one module: every parameter stacked along a new leading trial dimension
    (``torch.func.stack_module_state``'s layout), the K forwards one ``torch.vmap`` of
    ``torch.func.functional_call``.

    ``forward(r, c)`` takes ``r`` of shape ``(K, G, N)`` and ``c`` of shape ``(K, G)`` and returns the hypernet's
    output for every trial and preference with leading dimensions ``(K, G)`` (each output leaf of the
    single-preference forward). Trial ``k``'s slice of every parameter is its own hypernet: ``unstacked(k)``
    gives it back as a plain module.
    """

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        if not nets:
            raise ValueError("StackedHypernets needs at least one hypernet")
        structures = {(repr(n), tuple((k, tuple(v.shape)) for k, v in n.state_dict().items())) for n in nets}
        if len(structures) != 1:
            raise ValueError("batched trials need one hypernet structure (the same sizes and options in every "
                             "trial); run trials whose hypernets differ separately")
        if any(True for n in nets for _ in n.buffers()):
            raise ValueError("StackedHypernets stacks parameters only; these hypernets have buffers")
        self.names = [name for name, _ in nets[0].named_parameters()]
        self.stacked = nn.ParameterList(
            [nn.Parameter(torch.stack([dict(n.named_parameters())[name].detach() for n in nets]).clone())
             for name in self.names])
        # the template whose forward runs on the stacked slices; its own tensors are never read
        self.template = [copy.deepcopy(nets[0]).requires_grad_(False)]  # a list: not a registered submodule

    @property
    def trials(self) -> int:
        return int(self.stacked[0].shape[0])

    def params(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.stacked))

    def forward(self, r: Tensor, c: Tensor) -> Any:
        template = self.template[0].to(self.stacked[0].device)
        self.template[0] = template

        def one(params: dict[str, Tensor], r1: Tensor, c1: Tensor) -> Any:
            return functional_call(template, params, (r1, c1))

        per_preference = torch.vmap(one, in_dims=(None, 0, 0))  # over the G preferences of one trial
        return torch.vmap(per_preference, in_dims=(0, 0, 0))(self.params(), r, c)

    @torch.no_grad()
    def unstacked(self, k: int) -> nn.Module:
        """Trial ``k``'s hypernet as a plain module (a copy; its parameters detached from the stacked ones)."""
        net = copy.deepcopy(self.template[0])
        net.load_state_dict({name: p[k].detach().clone() for name, p in zip(self.names, self.stacked)})
        return net.requires_grad_(True)

    def state_dict_of(self, k: int, prefix: str = "") -> dict[str, Tensor]:
        """Trial ``k``'s parameters as the hypernet's own state dict (names prefixed by ``prefix``)."""
        return {prefix + name: p[k].detach().clone() for name, p in zip(self.names, self.stacked)}


@dataclass(frozen=True)
class AdamSettings:
    """One trial's Adam (``torch.optim.Adam``'s arguments; L2 weight decay added to the gradient, as Adam's)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> AdamSettings:
        """From a config's optimizer entry (``{class_path: torch.optim.Adam, init_args: {...}}``; None: the stages'
        default, Adam 1e-3). Other optimizers, and Adam's ``amsgrad``, ``maximize`` and the like, are refused:
        such trials run separately."""
        if spec is None:
            return cls()
        path = spec.get("class_path", "torch.optim.Adam")
        if path not in ("torch.optim.Adam", "torch.optim.adam.Adam", "Adam"):
            raise ValueError(f"batched trials support torch.optim.Adam only, got {path}")
        args = dict(spec.get("init_args") or {})
        known = {"lr", "betas", "eps", "weight_decay"}
        extra = {k: v for k, v in args.items() if k not in known and v not in (False, None)}
        if extra:
            raise ValueError(f"batched trials support Adam's lr, betas, eps and weight_decay only, got {extra}")
        betas = tuple(float(b) for b in args.get("betas", (0.9, 0.999)))
        return cls(float(args.get("lr", 1e-3)), (betas[0], betas[1]), float(args.get("eps", 1e-8)),
                   float(args.get("weight_decay", 0.0)))


class StackedAdam:
    """Adam over stacked parameters ``(K, ...)`` with every trial's own settings: the update of trial ``k``'s
    slice is ``torch.optim.Adam``'s (same formula) with ``settings[k]``; the moments are elementwise, so trial k's
    state is its slice of them.

    ``torch.optim.Adam`` skips a parameter whose gradient is None (no moment decay, no weight decay, no step
    count), which a single trial's step does for the parameters its loss did not reach (the weight hypernet's
    heads of the nodes that none of the step's trees uses; pinned edge heads). A stacked parameter always has a
    gradient, zero in such slices, so ``step(active)`` takes, per parameter, which trials' slices had a gradient
    (``(K,)`` bool; None: all), and keeps a step count per parameter and trial, as Adam's per-parameter state does.
    """

    def __init__(self, params: Iterable[Tensor], settings: Sequence[AdamSettings]) -> None:
        self.params = list(params)
        self.settings = list(settings)
        k = len(self.settings)
        if any(p.shape[0] != k for p in self.params):
            raise ValueError(f"every stacked parameter needs a leading dimension of {k} trials")
        device, dtype = self.params[0].device, self.params[0].dtype

        def column(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        self.lr = column([s.lr for s in self.settings])
        self.beta1 = column([s.betas[0] for s in self.settings])
        self.beta2 = column([s.betas[1] for s in self.settings])
        self.eps = column([s.eps for s in self.settings])
        self.weight_decay = column([s.weight_decay for s in self.settings])
        # the state of every parameter flattened into one (K, P) tensor each: a step is a fixed number of
        # operations, however many parameters (heads) the hypernet has
        self.counts = [p[0].numel() for p in self.params]
        total = sum(self.counts)
        self.steps = torch.zeros(k, len(self.params), dtype=dtype, device=device)  # per trial and parameter
        self.exp_avg = torch.zeros(k, total, dtype=dtype, device=device)
        self.exp_avg_sq = torch.zeros(k, total, dtype=dtype, device=device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Sequence[Tensor | None] | None = None) -> None:
        """One Adam step of every trial's slice of every parameter, or of the slices ``active`` marks (a
        parameter without a gradient is skipped for every trial)."""
        k = len(self.settings)
        device = self.exp_avg.device
        columns = []
        for i, p in enumerate(self.params):
            mask = None if active is None else active[i]
            if p.grad is None:
                columns.append(torch.zeros(k, dtype=torch.bool, device=device))
            else:
                columns.append(torch.ones(k, dtype=torch.bool, device=device) if mask is None else mask.to(device))
        kept = torch.stack(columns, dim=1)  # (K, parameters)
        if not bool(kept.any()):
            return
        every = bool(kept.all())
        counts = torch.tensor(self.counts, device=device)
        keep = None if every else torch.repeat_interleave(kept, counts, dim=1)  # (K, P)
        flat = torch.cat([p.detach().reshape(k, -1) for p in self.params], dim=1)
        grad = torch.cat([torch.zeros_like(p).reshape(k, -1) if p.grad is None else p.grad.reshape(k, -1)
                          for p in self.params], dim=1)
        col = (-1, 1)
        self.steps += kept.to(self.steps.dtype)
        t = self.steps.clamp_min(1)  # a slice that never stepped: not kept below
        bias1 = torch.repeat_interleave(1 - self.beta1.view(col) ** t, counts, dim=1)
        bias2_sqrt = torch.repeat_interleave((1 - self.beta2.view(col) ** t).sqrt(), counts, dim=1)
        grad = grad + self.weight_decay.view(col) * flat
        new_m = self.exp_avg.lerp(grad, (1 - self.beta1).view(col).expand_as(grad))
        new_v = (self.exp_avg_sq * self.beta2.view(col)).addcmul_(grad, grad * (1 - self.beta2).view(col))
        denom = (new_v.sqrt() / bias2_sqrt).add_(self.eps.view(col))
        new_flat = flat.addcdiv(new_m * (self.lr.view(col) / bias1), denom, value=-1.0)
        if keep is None:
            self.exp_avg, self.exp_avg_sq = new_m, new_v
        else:
            self.exp_avg = torch.where(keep, new_m, self.exp_avg)
            self.exp_avg_sq = torch.where(keep, new_v, self.exp_avg_sq)
            new_flat = torch.where(keep, new_flat, flat)
        for p, chunk in zip(self.params, new_flat.split(self.counts, dim=1)):
            p.copy_(chunk.view_as(p))

    def state_of(self, k: int) -> dict[str, Any]:
        """Trial ``k``'s moments and step counts (one per parameter)."""
        def per_parameter(state: Tensor) -> list[Tensor]:
            return [chunk[k].view_as(p[k]).clone() for p, chunk in zip(self.params, state.split(self.counts, dim=1))]

        return {"steps": [int(v) for v in self.steps[k]], "exp_avg": per_parameter(self.exp_avg),
                "exp_avg_sq": per_parameter(self.exp_avg_sq)}


# ---------------------------------------------------------------------------------------------------------
# the edge stage's Gumbel search, K trials at once


@dataclass(frozen=True)
class EdgeTrial:
    """One edge-stage trial's settings (``EdgeHypernetSearch``'s arguments of the same names; ``tau=None``: its
    default ``0.6 / N``)."""

    seed: int = 0
    tau: float | None = None
    lambda_active: float = 1.0
    lambda_inactive: float = 0.1
    temperature: float = 5.0
    temperature_decay: float = 0.97
    temperature_every: int | None = None
    dirichlet_eta: float = 0.2
    preference_groups: int = 1
    layer_weighting: str = "paper"
    use_affinity: bool = True
    task_dichotomy: bool = True
    use_inactive: bool = True
    straight_through: bool = True
    optimizer: AdamSettings = field(default_factory=AdamSettings)

    def regularizer(self, n_tasks: int) -> dict[str, Any]:
        """``dymu.regularizer.omega``'s keyword arguments (the stage's ``self.regularizer``)."""
        return {"tau": 0.6 / n_tasks if self.tau is None else float(self.tau), "lambda_active": self.lambda_active,
                "lambda_inactive": self.lambda_inactive, "layer_weighting": self.layer_weighting,
                "use_affinity": self.use_affinity, "task_dichotomy": self.task_dichotomy,
                "use_inactive": self.use_inactive}

    def preferences(self, n_tasks: int, step: int) -> list[Preference]:
        return draw_preferences(n_tasks, step, self.dirichlet_eta, self.preference_groups, self.seed)

    def temperature_at(self, step: int, total_steps: int) -> float:
        return temperature_at(step, total_steps, self.temperature, self.temperature_decay, self.temperature_every)


def _trial_batches(batches: Batch | Sequence[Batch], k: int) -> list[Batch]:
    """K batches: one per trial, or one batch that every trial sees."""
    if isinstance(batches, Mapping):
        return [batches] * k
    batches = list(batches)
    if len(batches) != k:
        raise ValueError(f"{k} trials need {k} batches (or one shared batch), got {len(batches)}")
    return batches


def _per_trial(values: Sequence[float], like: Tensor, ndim: int) -> Tensor:
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, *([1] * (ndim - 1)))


def batched_edge_search_loss(anchor: AnchorNet, hypernets: StackedHypernets, tasks: Sequence[Task],
                             scales: Tensor, batches: Batch | Sequence[Batch],
                             prefs: Sequence[Sequence[Preference]], temperatures: Sequence[float], affinity: Tensor,
                             regularizers: Sequence[Mapping[str, Any]], noise: Tensor,
                             straight_through: Sequence[bool] | bool = True) -> dict[str, Tensor]:
    """``dymu.training.edge_search_loss`` of K trials at once; every returned value has shape ``(K,)``, trial
    ``k``'s entry equal to ``edge_search_loss`` of trial k's hypernet on ``batches[k]`` with ``prefs[k]``,
    ``temperatures[k]``, ``regularizers[k]`` and ``noise[k]``.

    Args:
        anchor: the frozen anchor (eval mode), shared: it runs once on the K batches concatenated.
        hypernets: the K edge hypernets, stacked.
        tasks: the tasks.
        scales: the loss scales ``w_t``, ``(N,)`` for every trial or ``(K, N)``.
        batches: one batch per trial (all of one size), or one batch that every trial sees.
        prefs: K lists of G preferences (the same G for every trial).
        temperatures: the K trials' Gumbel temperatures.
        affinity: the task affinity ``(N, N)`` (one anchor, one affinity).
        regularizers: the K trials' ``omega`` keyword arguments (``EdgeTrial.regularizer``).
        noise: standard Gumbel noise ``(K, G, L, N, N)`` (``gumbel_noise`` with each trial's generator).
        straight_through: per trial (or one for all), as ``edge_search_loss``'s.
    """
    k = hypernets.trials
    trial_batches = _trial_batches(batches, k)
    if len(prefs) != k or len(temperatures) != k or len(regularizers) != k:
        raise ValueError(f"{k} trials need {k} preference lists, temperatures and regularizers")
    sizes_b = {int(b["image"].shape[0]) for b in trial_batches}
    if len(sizes_b) != 1:
        raise ValueError(f"batched trials need one batch size, got {sorted(sizes_b)}")
    batch_size = sizes_b.pop()
    parts = group_slices(batch_size, len(prefs[0]))
    if any(len(p) < len(parts) for p in prefs) or len({len(p) for p in prefs}) != 1:
        raise ValueError("batched trials need the same number of preference groups in every trial")
    prefs = [list(p)[:len(parts)] for p in prefs]
    g = len(parts)
    image = trial_batches[0]["image"]
    device = image.device
    r = torch.stack([torch.stack([p.r_tensor(device=device) for p in trial]) for trial in prefs])  # (K, G, N)
    c = torch.stack([torch.stack([p.c_tensor(device=device) for p in trial]) for trial in prefs])  # (K, G)
    logits = hypernets(r, c)  # (K, G, L, N, N)
    temperature = _per_trial(temperatures, logits, logits.ndim)
    soft = F.softmax((logits + noise[:, :g].to(logits)) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    hard = hard - soft.detach() + soft
    st = [straight_through] * k if isinstance(straight_through, bool) else list(straight_through)
    if all(st):
        chosen = hard
    elif not any(st):
        chosen = soft
    else:
        chosen = torch.where(torch.tensor(st, device=device).view(-1, 1, 1, 1, 1), hard, soft)
    sizes = torch.tensor([p.stop - p.start for p in parts] * k, device=device)
    per_sample = torch.repeat_interleave(chosen.flatten(0, 1), sizes, dim=0)  # (K * B, L, N, N)
    images = image if isinstance(batches, Mapping) and k == 1 else torch.cat([b["image"] for b in trial_batches])
    outputs = anchor(images, samples=per_sample)
    trial_scales = scales if scales.ndim == 2 else scales.expand(k, -1)
    # one split per output (its backward is one concatenation), not K x G slices (each slice's backward would
    # write a zero tensor of the whole output: quadratic in K)
    chunks = {name: out.split(sizes.tolist()) for name, out in outputs.items()}
    task_terms = []
    for t in range(k):
        terms = []
        for gi, part in enumerate(parts):
            group = {name: chunk[t * g + gi] for name, chunk in chunks.items()}
            losses = task_losses(list(tasks), group, batch_slice(trial_batches[t], part))
            terms.append(preference_loss(losses, r[t, gi], trial_scales[t]))
        task_terms.append(torch.stack(terms).mean())
    reg = _batched_omega(soft, r, c, affinity, regularizers)
    out = {key: reg[key].mean(dim=1) for key in ("omega", "active", "inactive")}
    out["expected_used_fraction"] = reg["usage"][:, :, :-1].mean(dim=(1, 2, 3))
    out["task_loss"] = torch.stack(task_terms)
    out["loss"] = out["task_loss"] + out["omega"]
    return out


NUMERIC = ("tau", "lambda_active", "lambda_inactive")


def _batched_omega(soft: Tensor, r: Tensor, c: Tensor, affinity: Tensor,
                   regularizers: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """``omega`` of every trial's groups, ``(K, G)`` values: one call when the trials differ in the numeric
    weights only (``tau`` and the lambdas broadcast per trial), else one call per trial."""
    others = [{key: v for key, v in reg.items() if key not in NUMERIC} for reg in regularizers]
    if all(o == others[0] for o in others):
        tau = _per_trial([reg["tau"] for reg in regularizers], r, 3)  # against r (K, G, N)
        lam_a = _per_trial([reg["lambda_active"] for reg in regularizers], soft, 2)  # against (K, G)
        lam_i = _per_trial([reg["lambda_inactive"] for reg in regularizers], soft, 2)
        return omega(soft, r, c, affinity, tau=tau, lambda_active=lam_a, lambda_inactive=lam_i,  # type: ignore[arg-type]
                     **others[0])
    parts = [omega(soft[t], r[t], c[t], affinity, **reg) for t, reg in enumerate(regularizers)]
    return {key: torch.stack([p[key] for p in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------------------------------------
# the weight stage, K trials at once


def batched_weight_adaptation_loss(anchor: AnchorNet, hypernets: StackedHypernets,
                                   trees: Sequence[Callable[[Preference], Architecture]], tasks: Sequence[Task],
                                   scales: Tensor, batches: Batch | Sequence[Batch],
                                   prefs: Sequence[Sequence[Preference]], bn_statistics: str = "running",
                                   vmap_trees: bool = False) -> dict[str, Tensor]:
    """``dymu.training.weight_adaptation_loss`` of K trials at once: ``loss`` ``(K,)``, ``losses`` ``(K, N)`` and
    ``active_heads`` ``(K, heads)``, whether head i's BatchNorm (``bn_names[i]``) is in one of trial k's trees of
    this step (the heads whose parameters get a gradient in a single trial's step).

    The K x G BatchNorm shifts come from one stacked call of the weight hypernets; each trial's tree for each of
    its preferences from ``trees[k]`` (its own frozen edge hypernet or controller: ``model.architecture`` of the
    trial's edge-stage model). The frozen anchor is shared; each (trial, group) runs its tree as one call, or with
    ``vmap_trees`` the groups of one tree (over trials and preferences, sub-batches of one size) as one ``vmap``
    over their shifts (equal, tested; slower on CPU: docs/performance.md).
    """
    k = hypernets.trials
    trial_batches = _trial_batches(batches, k)
    if len(prefs) != k or len(trees) != k:
        raise ValueError(f"{k} trials need {k} preference lists and tree functions")
    image = trial_batches[0]["image"]
    device = image.device
    parts = group_slices(int(image.shape[0]), len(prefs[0]))
    if len({len(p) for p in prefs}) != 1 or any(int(b["image"].shape[0]) != image.shape[0] for b in trial_batches):
        raise ValueError("batched trials need one batch size and one number of preference groups")
    prefs = [list(p)[:len(parts)] for p in prefs]
    r = torch.stack([torch.stack([p.r_tensor(device=device) for p in trial]) for trial in prefs])
    c = torch.stack([torch.stack([p.c_tensor(device=device) for p in trial]) for trial in prefs])
    deltas = hypernets(r, c)  # {bn: ((K, G, C), (K, G, C))}
    trial_scales = scales if scales.ndim == 2 else scales.expand(k, -1)
    jobs: dict[tuple[Architecture, int], list[tuple[int, int]]] = {}
    for t in range(k):
        for gi, (pref, part) in enumerate(zip(prefs[t], parts)):
            jobs.setdefault((trees[t](pref), part.stop - part.start), []).append((t, gi))
    losses: dict[tuple[int, int], Tensor] = {}
    context = batch_statistics(anchor) if bn_statistics == "batch" else nullcontext()
    with context:
        for (arch, _), members in jobs.items():
            if len(members) == 1 or bn_statistics == "batch" or not vmap_trees:
                for t, gi in members:
                    sub = batch_slice(trial_batches[t], parts[gi])
                    shifts = {name: (dg[t, gi], db[t, gi]) for name, (dg, db) in deltas.items()}
                    out = anchor(sub["image"], architecture=arch, bn_deltas=shifts)
                    losses[(t, gi)] = task_losses(list(tasks), out, sub)
                continue
            subs = [batch_slice(trial_batches[t], parts[gi]) for t, gi in members]
            idx_t = torch.tensor([t for t, _ in members], device=device)
            idx_g = torch.tensor([gi for _, gi in members], device=device)
            shifts = {name: (dg[idx_t, idx_g], db[idx_t, idx_g]) for name, (dg, db) in deltas.items()}
            images = torch.stack([s["image"] for s in subs])

            def run(shift: Any, x: Tensor, arch: Architecture = arch) -> dict[str, Tensor]:
                return anchor(x, architecture=arch, bn_deltas=shift)

            outs = torch.vmap(run)(shifts, images)
            for i, (t, gi) in enumerate(members):
                losses[(t, gi)] = task_losses(list(tasks), {name: o[i] for name, o in outs.items()}, subs[i])
    used = [set() for _ in range(k)]  # the nodes (layer, stream) of each trial's trees in this step
    for (arch, _), members in jobs.items():
        nodes = {(layer, stream) for layer, streams in enumerate(arch.used_nodes()) for stream in streams}
        for t, _ in members:
            used[t] |= nodes
    bn_nodes = [(int(name.split(".")[2]), int(name.split(".")[1])) for name in hypernets.template[0].bn_names]
    active = torch.tensor([[node in used[t] for node in bn_nodes] for t in range(k)], dtype=torch.bool,
                          device=device)
    loss, per_task = [], []
    for t in range(k):
        values = [losses[(t, gi)] for gi in range(len(parts))]
        loss.append(torch.stack([preference_loss(v, r[t, gi], trial_scales[t]) for gi, v in enumerate(values)]).mean())
        per_task.append(torch.stack(values).mean(dim=0))
    return {"loss": torch.stack(loss), "losses": torch.stack(per_task), "active_heads": active}


@dataclass(frozen=True)
class WeightTrial:
    """One weight-stage trial's settings (``WeightHypernetAdaptation``'s arguments of the same names)."""

    seed: int = 0
    dirichlet_eta: float = 0.2
    preference_groups: int = 1
    optimizer: AdamSettings = field(default_factory=AdamSettings)

    def preferences(self, n_tasks: int, step: int) -> list[Preference]:
        return draw_preferences(n_tasks, step, self.dirichlet_eta, self.preference_groups, self.seed)


# ---------------------------------------------------------------------------------------------------------
# training loops


class BatchedEdgeTrials:
    """K edge-stage trials (``search: gumbel``) on one frozen anchor: stacked hypernets, ``StackedAdam``, and
    ``step(batches)``, one training step of every trial.

    Args:
        anchor: the frozen anchor (put in eval mode, gradients off).
        hypernets: the K trials' initial edge hypernets (one structure).
        trials: the K trials' settings.
        tasks, affinity: the stage's tasks and the anchor's affinity.
        scales: loss scales ``(N,)`` or ``(K, N)``.
        total_steps: the step budget (``trainer.max_steps``; the temperature schedule's ``every=None`` needs it).
    """

    def __init__(self, anchor: AnchorNet, hypernets: Sequence[nn.Module], trials: Sequence[EdgeTrial],
                 tasks: Sequence[Task], affinity: Tensor, scales: Tensor, total_steps: int) -> None:
        if len(hypernets) != len(trials):
            raise ValueError(f"{len(trials)} trials need {len(trials)} hypernets, got {len(hypernets)}")
        if len({t.preference_groups for t in trials}) != 1:
            raise ValueError("batched edge trials need one preference_groups for every trial")
        self.anchor = anchor.eval().requires_grad_(False)
        self.trials, self.tasks = list(trials), list(tasks)
        self.affinity, self.scales, self.total_steps = affinity, scales, total_steps
        self.hypernets = StackedHypernets(hypernets)
        self.optimizer = StackedAdam(self.hypernets.stacked, [t.optimizer for t in trials])
        self.global_step = 0

    @property
    def n_tasks(self) -> int:
        return self.anchor.n_tasks

    def noise(self, step: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Every trial's Gumbel noise of ``step``, ``(K, G, L, N, N)``: trial k's from its own generator."""
        shape = (self.trials[0].preference_groups, self.anchor.n_layers, self.n_tasks, self.n_tasks)
        return torch.stack([gumbel_noise(shape, noise_generator(t.seed, step, device), device, dtype)
                            for t in self.trials])

    def loss(self, batches: Batch | Sequence[Batch], step: int | None = None) -> dict[str, Tensor]:
        step = self.global_step if step is None else step
        dtype = self.hypernets.stacked[0].dtype
        device = self.hypernets.stacked[0].device
        return batched_edge_search_loss(
            self.anchor, self.hypernets, self.tasks, self.scales, batches,
            [t.preferences(self.n_tasks, step) for t in self.trials],
            [t.temperature_at(step, self.total_steps) for t in self.trials], self.affinity,
            [t.regularizer(self.n_tasks) for t in self.trials], self.noise(step, device, dtype),
            [t.straight_through for t in self.trials])

    def active(self) -> list[Tensor | None]:
        """Per stacked parameter, the trials whose slice gets a gradient (``StackedAdam.step``): every one, except
        the pinned last heads' (``pin_heads``), which a single trial's step never reaches."""
        template = self.hypernets.template[0]
        last = template.n_layers - 1
        never = {f"heads.{last}.weight", f"heads.{last}.bias", f"c_heads.{last}.weight", f"c_heads.{last}.bias"}
        k = self.hypernets.trials
        return [torch.zeros(k, dtype=torch.bool, device=p.device) if template.pin_heads and name in never else None
                for name, p in zip(self.hypernets.names, self.hypernets.stacked)]

    def step(self, batches: Batch | Sequence[Batch]) -> dict[str, Tensor]:
        """One training step of every trial; returns the step's per-trial values (detached, ``(K,)``)."""
        self.optimizer.zero_grad()
        out = self.loss(batches)
        out["loss"].sum().backward()
        self.optimizer.step(self.active())
        self.global_step += 1
        return {key: v.detach() for key, v in out.items()}


class BatchedWeightTrials:
    """K weight-stage trials on one frozen anchor, each over its own frozen edge model (``trees[k]``: the
    trial's ``model.architecture``): stacked weight hypernets, ``StackedAdam``, ``step(batches)``."""

    def __init__(self, anchor: AnchorNet, hypernets: Sequence[nn.Module],
                 trees: Sequence[Callable[[Preference], Architecture]], trials: Sequence[WeightTrial],
                 tasks: Sequence[Task], scales: Tensor, bn_statistics: str = "running", vmap_trees: bool = False
                 ) -> None:
        if not len(hypernets) == len(trees) == len(trials):
            raise ValueError("batched weight trials need one hypernet, one tree function and one setting per trial")
        if len({t.preference_groups for t in trials}) != 1:
            raise ValueError("batched weight trials need one preference_groups for every trial")
        self.anchor = anchor.eval().requires_grad_(False)
        self.trees, self.trials, self.tasks = list(trees), list(trials), list(tasks)
        self.scales, self.bn_statistics, self.vmap_trees = scales, bn_statistics, vmap_trees
        self.hypernets = StackedHypernets(hypernets)
        self.optimizer = StackedAdam(self.hypernets.stacked, [t.optimizer for t in trials])
        self.global_step = 0

    def loss(self, batches: Batch | Sequence[Batch], step: int | None = None) -> dict[str, Tensor]:
        step = self.global_step if step is None else step
        n = self.anchor.n_tasks
        return batched_weight_adaptation_loss(self.anchor, self.hypernets, self.trees, self.tasks, self.scales,
                                              batches, [t.preferences(n, step) for t in self.trials],
                                              self.bn_statistics, self.vmap_trees)

    def active(self, heads: Tensor) -> list[Tensor | None]:
        """Per stacked parameter, the trials whose slice gets a gradient: head i's when its BatchNorm's node is
        in one of the trial's trees (``heads``: the loss's ``active_heads``), the embedding and body when any
        head is."""
        out: list[Tensor | None] = []
        for name in self.hypernets.names:
            parts = name.split(".")
            out.append(heads[:, int(parts[1])] if parts[0] == "heads" else heads.any(dim=1))
        return out

    def step(self, batches: Batch | Sequence[Batch]) -> dict[str, Tensor]:
        """One training step of every trial; returns the step's per-trial values (detached)."""
        self.optimizer.zero_grad()
        out = self.loss(batches)
        out["loss"].sum().backward()
        self.optimizer.step(self.active(out["active_heads"]))
        self.global_step += 1
        return {key: v.detach() for key, v in out.items()}


def train_trials(trials: BatchedEdgeTrials | BatchedWeightTrials, batches: Iterator[Batch | Sequence[Batch]],
                 steps: int, on_step: Callable[[int, dict[str, Tensor]], None] | None = None) -> None:
    """Run ``steps`` training steps of every trial, one batch (or K batches) from ``batches`` per step;
    ``on_step(step, values)`` after each (logging, checkpoints: ``hypernets.state_dict_of(k)``)."""
    for _ in range(steps):
        values = trials.step(next(batches))
        if on_step is not None:
            on_step(trials.global_step, values)


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc): ``mallopt`` an mmap threshold of 32 MiB and a trim threshold of
    1 GiB, so that the large activations of a K-trial step are reused from one step to the next instead of being
    returned to the system and faulted in again (measured on the quickstart at K = 6: about 11,000 page faults and
    a fifth of the step without it; docs/performance.md, "Trials batched in one process"). A process-wide
    setting, for a process that trains batched trials; returns False where ``mallopt`` is not available."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


__all__ = ["AdamSettings", "BatchedEdgeTrials", "BatchedWeightTrials", "EdgeTrial", "StackedAdam",
           "StackedHypernets", "WeightTrial", "batched_edge_search_loss", "batched_weight_adaptation_loss",
           "draw_preferences", "gumbel_noise", "noise_generator", "order_generator", "retain_freed_memory",
           "seed_batch_order", "train_trials"]
