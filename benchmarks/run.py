"""Benchmark of the method's costs, side by side in one run: prints a Markdown table and writes
``benchmarks/results/<machine>.json`` (and the table beside it as ``<machine>.md``).

For the quickstart network, the synthetic-regression MLP and each paper network (at a reduced input size by
default, the paper's with ``--paper_size``), it measures:

- the training step of every stage (anchor, edge, weight), the anchor's against the N single-task networks
  trained one after another on the same batch, and the edge step against the anchor's forward+backward;
- the evaluation protocol's throughput (20 preferences x c in {0, 1}, each distinct configuration once);
- a specialised tree's latency against a hand-built static network of the same tree, and latency against
  GFLOPs across trees from the anchor (the c = 0 end) to the fully shared tree (the c = 1 end);
- the preference switch (hypernets + specialise), cold and cached by architecture;
- the served model (``specialize(r, c, fold_bn=True)``) against the hand-built static network of its tree and
  the unfolded specialised model, ONNX Runtime against it, at batch 1 and the benchmark's batch, and latency
  against GFLOPs over the uniform preference's trees from c = 0 to 1 (budgets 1 to 0.5 with a controller);
- data loading per worker (PASCAL-Context, NYU-v2 fixtures) against the step time;
- the peak memory of each;

each with and without the switches: streams stacked into one call per layer (``AnchorNet.stacked``),
``bf16`` autocast, ``torch.compile``. Times are medians over repeats, warm-up excluded, the candidates of a
comparison interleaved round by round so that a noisy, shared machine slows all of them alike.

A plain script rather than pytest-benchmark: the rows are ratios between measurements taken together (one
network's step against another's, in one interleaved loop), with machine metadata, a per-network table and
targets, while pytest-benchmark times one callable per test and compares runs over time; and speed goals
belong in a benchmark, never in the test suite (``tests/test_benchmarks.py`` only runs ``--quick`` as a
smoke test, with no timing assertion).

Run it from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/run.py`` (``--quick`` for the smoke
mode, ``--device cuda --paper_size`` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# compile times are reported cold: inductor's caches from an earlier run would hide them
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.measure import interleaved_times, machine_description, machine_name, median_ms, peak_memory_mb  # noqa: E402,E501
from benchmarks.networks import (  # noqa: E402
    NETWORKS,
    Network,
    Size,
    build_model,
    edge_settings,
    first_batch,
    instantiate,
    make_datamodule,
    training_preferences,
    weight_groups,
)
from benchmarks.static import SingleTaskNet, StaticTree  # noqa: E402
from benchmarks.trials import KEPT_K, TRIAL_ROWS, measure_in_child  # noqa: E402
from dymu.captured import CapturedStep, resolve_compile_step  # noqa: E402
from dymu.evaluation import Evaluated, LossSums, configuration_forwards, protocol_variants  # noqa: E402
from dymu.preference import evaluation_preferences  # noqa: E402
from dymu.search_space import Architecture  # noqa: E402
from dymu.switch import SpecializationCache  # noqa: E402
from dymu.tasks import preference_loss, task_losses  # noqa: E402
from dymu.training import captured_edge_loss, edge_search_loss, preference_tensors, weight_adaptation_loss  # noqa: E402,E501

TRAIN_ROWS = [("anchor_step", "fp32"), ("anchor_step", "stacked"), ("anchor_step", "bf16"),
              ("anchor_step", "compile"), ("single_task_nets_step", "fp32"), ("anchor_fwd_bwd", "fp32"),
              ("edge_step", "fp32"), ("edge_step", "stacked"), ("edge_step", "bf16"), ("edge_step", "captured compile"),
              ("weight_step", "fp32")]
OTHER_ROWS = [("eval_protocol", "fp32"),
              ("specialized_latency", "c=0"), ("static_latency", "c=0"), ("specialized_latency", "c=1"),
              ("static_latency", "c=1"), ("specialized_latency", "c=0 bf16"), ("specialized_latency", "c=0 compile"),
              ("latency_vs_gflops", "trees c=0..1"),
              ("preference_switch", "cold"), ("preference_switch", "hypernets only"), ("preference_switch", "cached")]
LOADING_ROWS = [("data_loading", "paper crop, 1 worker"), ("data_loading", "bench crop, 1 worker")]
DEPLOY_BATCHES = ("batch 1", "large batch")
DEPLOY_ROWS = [(row, variant) for variant in DEPLOY_BATCHES
               for row in ("deploy_static", "deploy_specialized", "deploy_folded", "deploy_onnxruntime")] + \
              [("deploy_latency_vs_gflops", f"uniform r, {variant}") for variant in DEPLOY_BATCHES]


SECTIONS = ("training", "evaluation", "latency", "switch", "deploy", "loading", "trials")
TRIALS_NETWORKS = ("quickstart", "synthetic_regression")  # the trials rows' networks (all: --trials_all or a GPU)


def expected_rows(network: Network) -> list[tuple[str, str]]:
    """Every ``(row, variant)`` a network's results hold (a row that cannot run is there, ``skipped``)."""
    return TRAIN_ROWS + OTHER_ROWS + DEPLOY_ROWS + (LOADING_ROWS if network.loading is not None else []) + \
        (TRIAL_ROWS if network.name in TRIALS_NETWORKS else [])


# ---------------------------------------------------------------------------------------------------------
# settings


def repeats_for(network: Network, quick: bool) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) of the training comparisons."""
    if quick:
        return 0, 1  # every candidate has run once already (the check that it works)
    return (2, 10) if network.name in ("quickstart", "synthetic_regression") else (1, 5)


def autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


@contextmanager
def stacked_mode(anchor: Any, on: bool) -> Iterator[None]:
    before = anchor.stacked
    anchor.stacked = on
    try:
        yield
    finally:
        anchor.stacked = before


class Results:
    """The rows of one network, in order."""

    def __init__(self, network: str) -> None:
        self.network, self.rows = network, []

    def add(self, row: str, variant: str, times: list[float] | None = None, peak: tuple[float | None, str] | None = None,
            vs: tuple[str, str] | None = None, ref_times: list[float] | None = None, status: str = "ok",
            note: str = "", **extra: Any) -> dict[str, Any]:
        """One row. With ``ref_times`` (the reference's times from the same interleaved loop) the ratio is the
        median of the per-round ratios, which a slow phase of the machine affects less than the ratio of the
        medians (``fill_ratios``, used otherwise)."""
        paired = (float(np.median([a / b for a, b in zip(times, ref_times)]))
                  if times and ref_times and len(times) == len(ref_times) else None)
        entry: dict[str, Any] = {"network": self.network, "row": row, "variant": variant, "status": status,
                                 "median_ms": median_ms(times) if times else None,
                                 "times_ms": [1e3 * t for t in times] if times else [],
                                 "peak_mb": peak[0] if peak else None, "memory": peak[1] if peak else None,
                                 "vs": list(vs) if vs else None, "ratio": paired, "paired": paired is not None,
                                 "note": note, "extra": extra}
        self.rows.append(entry)
        return entry

    def get(self, row: str, variant: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if (r["row"], r["variant"]) == (row, variant)), None)

    def skip(self, row: str, variant: str, reason: str) -> None:
        self.add(row, variant, status="skipped", note=reason)

    def fail(self, row: str, variant: str, error: BaseException) -> None:
        self.add(row, variant, status="failed", note=f"{type(error).__name__}: {error}".splitlines()[0][:200])

    def fill_ratios(self) -> None:
        for r in self.rows:
            if r["vs"] and r["median_ms"] is not None and r["ratio"] is None:
                ref = self.get(*r["vs"])
                if ref is not None and ref["median_ms"]:
                    r["ratio"] = r["median_ms"] / ref["median_ms"]


# ---------------------------------------------------------------------------------------------------------
# the steps


def anchor_loss(anchor: Any, tasks: list[Any], scales: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Stage 1's objective ``sum_t w_t L_t`` (``AnchorPretraining.training_step``), as ``preference_loss``
    with every ``r_t = 1``."""
    losses = task_losses(tasks, anchor(batch["image"]), batch)
    return preference_loss(losses, torch.ones_like(scales), scales)


def stage_optimizer(config: dict[str, Any], stage: str, params: Any) -> torch.optim.Optimizer:
    """The optimizer of the config's ``stage`` (``<stage>.model.optimizer``; Adam 1e-3, the stages' default)."""
    spec = ((config.get(stage) or {}).get("model") or {}).get("optimizer")
    if spec is None:
        return torch.optim.Adam(params, lr=1e-3)
    return instantiate(spec, params=params)


def step_fn(loss: Callable[[], Tensor], optimizer: torch.optim.Optimizer | None, device: torch.device,
            bf16: bool = False) -> Callable[[], None]:
    """One training step (zero the gradients, loss, backward, optimizer step; no step if ``optimizer`` is
    None: a forward+backward)."""
    params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []

    def run() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            value = loss()
        value.backward()
        if optimizer is not None:
            optimizer.step()
        for p in params:
            p.grad = None

    return run


def measure_training(res: Results, net: Network, model: Any, tasks: list[Any], batch: dict[str, Tensor],
                     config: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    n = model.n_tasks
    scales = torch.tensor([t.scale for t in tasks], device=device)
    warmup, repeats = repeats_for(net, args.quick)
    model = copy.deepcopy(model)  # the optimizer steps below must not change the model the later rows use

    # stage 1: the anchor trains every stream (train mode, Adam over all of it)
    stage1 = copy.deepcopy(model.anchor).train().requires_grad_(True)
    opt1 = stage_optimizer(config, "anchor", stage1.parameters())
    anchor_step = step_fn(lambda: anchor_loss(stage1, tasks, scales, batch), opt1, device)

    def stacked_anchor_step() -> None:
        with stacked_mode(stage1, True):
            anchor_step()

    # the N single-task networks, one after another
    singles = [SingleTaskNet(copy.deepcopy(list(stage1.streams[t])), copy.deepcopy(stage1.heads[t])).train()
               for t in range(n)]
    single_opts = [stage_optimizer(config, "anchor", s.parameters()) for s in singles]
    single_steps = [step_fn(lambda s=s, t=t: tasks[t].scale * tasks[t].loss(s(batch["image"]), batch[tasks[t].name]),
                            o, device) for t, (s, o) in enumerate(zip(singles, single_opts))]

    def singles_step() -> None:
        for step in single_steps:
            step()

    fwd_bwd = step_fn(lambda: anchor_loss(stage1, tasks, scales, batch), None, device)

    # stage 2: the edge hypernet over the frozen anchor (eval mode), Adam over the hypernet
    edge_args, regularizer, groups = edge_settings(config, n)
    prefs = training_preferences(n, groups, seed=1)
    affinity = torch.full((n, n), 0.5, device=device).fill_diagonal_(1.0)
    model.requires_grad_(False)
    model.anchor.eval()
    model.edge_hypernet.requires_grad_(True)
    opt2 = stage_optimizer(config, "edge", model.edge_hypernet.parameters())

    def edge_objective() -> Tensor:
        return edge_search_loss(model.anchor, model.edge_hypernet, tasks, scales, batch, prefs, 1.0, affinity,
                                regularizer)["loss"]

    edge_step = step_fn(edge_objective, opt2, device)

    def stacked_edge_step() -> None:
        with stacked_mode(model.anchor, True):
            edge_step()

    # stage 3: the weight hypernet on the maximum-likelihood trees
    model.weight_hypernet.requires_grad_(True)
    prefs_w = training_preferences(n, weight_groups(config), seed=2)
    opt3 = stage_optimizer(config, "weight", model.weight_hypernet.parameters())
    weight_step = step_fn(lambda: weight_adaptation_loss(model, tasks, scales, batch, prefs_w)["loss"], opt3, device)

    candidates: dict[tuple[str, str], Callable[[], None]] = {
        ("anchor_step", "fp32"): anchor_step, ("anchor_step", "stacked"): stacked_anchor_step,
        ("single_task_nets_step", "fp32"): singles_step, ("anchor_fwd_bwd", "fp32"): fwd_bwd,
        ("edge_step", "fp32"): edge_step, ("edge_step", "stacked"): stacked_edge_step,
        ("weight_step", "fp32"): weight_step,
    }
    if args.no_bf16:
        res_skips = [("anchor_step", "bf16"), ("edge_step", "bf16")]
    else:
        res_skips = []
        candidates[("anchor_step", "bf16")] = step_fn(lambda: anchor_loss(stage1, tasks, scales, batch), opt1,
                                                      device, bf16=True)
        candidates[("edge_step", "bf16")] = step_fn(edge_objective, opt2, device, bf16=True)
    working: dict[tuple[str, str], Callable[[], None]] = {}
    first_peaks: dict[tuple[str, str], tuple[float | None, str]] = {}
    for key, fn in candidates.items():
        try:
            first_peaks[key] = peak_memory_mb(fn, device)  # a candidate that fails is reported, not timed
            working[key] = fn
        except Exception as error:  # noqa: BLE001 - the row says what failed
            res.fail(*key, error)
    times = interleaved_times({f"{k[0]}|{k[1]}": f for k, f in working.items()}, warmup, repeats, device)
    refs = {"anchor_step": ("single_task_nets_step", "fp32"), "anchor_fwd_bwd": ("single_task_nets_step", "fp32"),
            "edge_step": ("anchor_fwd_bwd", "fp32"), "weight_step": ("anchor_step", "fp32")}
    notes = {("anchor_step", "fp32"): f"batch {batch['image'].shape[0]}, {n} streams, {type(opt1).__name__}",
             ("single_task_nets_step", "fp32"): f"{n} networks one after another, each its own optimizer step",
             ("anchor_fwd_bwd", "fp32"): "stage-1 forward+backward, no optimizer step",
             ("edge_step", "fp32"): f"{len(prefs)} preference group(s), frozen anchor in eval mode",
             ("weight_step", "fp32"): f"{len(prefs_w)} preference group(s)"}
    for key in candidates:
        if key not in working:
            continue
        row, variant = key
        vs = refs.get(row)
        if variant in ("stacked", "bf16"):
            vs = (row, "fp32")
        ref = times.get(f"{vs[0]}|{vs[1]}") if vs else None
        # --quick keeps the first call's peak (it includes allocating the optimizer's state) to save a call
        peak = first_peaks[key] if args.quick else peak_memory_mb(working[key], device)
        res.add(row, variant, times[f"{row}|{variant}"], peak, vs=vs,
                ref_times=ref, note=notes.get(key, ""))
    for key in res_skips:
        res.skip(*key, "--no_bf16")
    order = {k: i for i, k in enumerate(TRAIN_ROWS)}
    res.rows.sort(key=lambda r: order.get((r["row"], r["variant"]), len(order)))

    # torch.compile: its own interleaved comparison against the eager step (compiling happens before)
    reason = compile_skip_reason(net, args, device)
    if reason:
        res.skip("anchor_step", "compile", reason)
        res.skip("edge_step", "captured compile", reason)
        return
    try:
        compiled_anchor = copy.deepcopy(stage1)
        compiled = torch.compile(compiled_anchor)
        opt_c = stage_optimizer(config, "anchor", compiled_anchor.parameters())
        compiled_step = step_fn(lambda: anchor_loss(compiled, tasks, scales, batch), opt_c, device)
        start = time.perf_counter()
        compiled_step()
        compile_s = time.perf_counter() - start
        t = interleaved_times({"eager": anchor_step, "compiled": compiled_step}, warmup, repeats, device)
        res.add("anchor_step", "compile", t["compiled"], peak_memory_mb(compiled_step, device),
                vs=("anchor_step", "fp32"), ref_times=t["eager"], note=f"first call (compiling) {compile_s:.0f} s",
                compile_s=compile_s, eager_same_loop_ms=median_ms(t["eager"]))
    except Exception as error:  # noqa: BLE001
        res.fail("anchor_step", "compile", error)
    try:
        measure_captured_edge(res, model, tasks, scales, batch, prefs, affinity, regularizer, config, edge_step,
                              warmup, repeats, device)
    except Exception as error:  # noqa: BLE001
        res.fail("edge_step", "captured compile", error)


def measure_captured_edge(res: Results, model: Any, tasks: list[Any], scales: Tensor, batch: dict[str, Tensor],
                          prefs: list[Any], affinity: Tensor, regularizer: dict[str, Any], config: dict[str, Any],
                          eager_step: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> None:
    """The edge stage's ``compile_step``: ``captured_edge_loss`` compiled whole (``dymu.captured.CapturedStep``,
    ``"reduce-overhead"`` on CUDA, ``"default"`` elsewhere) on its own copy of the model and optimizer, against the
    eager step in one interleaved loop; each step as the stage runs it (the preferences and the temperature made
    tensors, the noise drawn inside), the optimizer step eager. The first call (compiling) is not timed."""
    mode = resolve_compile_step("auto", device) if device.type == "cuda" else "default"
    copy_ = copy.deepcopy(model)
    optimizer = stage_optimizer(config, "edge", copy_.edge_hypernet.parameters())
    captured = CapturedStep(captured_edge_loss, mode, "benchmark edge")
    tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}

    def objective() -> Tensor:
        r, c = preference_tensors(prefs, "cpu")
        out = captured(copy_.anchor, copy_.edge_hypernet, tasks, scales, tensors, r.to(device), c.to(device),
                       torch.tensor(1.0, device=device), affinity, regularizer)
        if out is None:
            raise RuntimeError(f"compile_step={mode!r} could not compile the edge step (see the warning)")
        return out["loss"]

    compiled_step = step_fn(objective, optimizer, device)
    start = time.perf_counter()
    compiled_step()
    compile_s = time.perf_counter() - start
    t = interleaved_times({"eager": eager_step, "captured": compiled_step}, warmup, repeats, device)
    res.add("edge_step", "captured compile", t["captured"], peak_memory_mb(compiled_step, device),
            vs=("edge_step", "fp32"), ref_times=t["eager"],
            note=f"mode {mode}; first call (compiling) {compile_s:.0f} s", compile_s=compile_s, mode=mode,
            eager_same_loop_ms=median_ms(t["eager"]))


def compile_skip_reason(net: Network, args: argparse.Namespace, device: torch.device) -> str:
    if args.no_compile:
        return "--no_compile"
    if args.quick:
        return "--quick (compiling takes minutes)"
    if device.type == "cpu" and not net.compile_on_cpu and not args.compile_all:
        return "not on CPU for this network by default (--compile_all)"
    return ""


# ---------------------------------------------------------------------------------------------------------
# evaluation, latency, switching


def measure_evaluation(res: Results, model: Any, tasks: list[Any], batch: dict[str, Tensor],
                       args: argparse.Namespace, device: torch.device) -> None:
    n = model.n_tasks
    count = 2 if args.quick else 20
    model.eval()
    variants = protocol_variants(model, recalibrate=False)
    evaluated = [Evaluated.create(model, v, p) for c in (0.0, 1.0) for v in variants
                 for p in evaluation_preferences(n, count, c=c, seed=0)]
    start = time.perf_counter()
    forwards = configuration_forwards(model, evaluated)
    build_s = time.perf_counter() - start
    sums = LossSums(forwards, tasks).to(device)
    fn = partial(sums.update, batch)
    if args.quick:
        times = interleaved_times({"eval": fn}, 0, 1, device)["eval"]
    else:
        first = interleaved_times({"eval": fn}, 0, 1, device)["eval"][0]  # warm-up, and how long one batch takes
        times = interleaved_times({"eval": fn}, 0, max(1, min(3, int(30 / first))), device)["eval"]
    images = batch["image"].shape[0]
    trees = len({e.architecture for e in evaluated})
    per_s = images / float(np.median(times))
    res.add("eval_protocol", "fp32", times, peak_memory_mb(fn, device),
            note=f"{per_s:.1f} test images/s through {len(forwards)} configurations ({trees} distinct trees, "
                 f"{len(evaluated)} scored pairs)",
            images_per_s=per_s, configuration_images_per_s=per_s * len(forwards), configurations=len(forwards),
            distinct_trees=trees, scored_pairs=len(evaluated), build_s=build_s, batch=images)


def latency_repeats(fn: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> tuple[int, int]:
    """(warm-up, timed rounds) of a latency loop: about 10 s of rounds (``fn`` is one round), 5 to 40."""
    if args.quick:
        return 1, 2
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return 3, max(5, min(40, int(10.0 / max(once, 1e-6))))


def branch_tree(n_tasks: int, n_layers: int, branch: int) -> Architecture:
    """One stream (stream 0) shared by every task below layer ``branch``, separate streams from it on:
    ``branch = 0`` is the anchor (the c = 0 end), ``branch = L`` the fully shared network (the c = 1 end)."""
    return Architecture(tuple(tuple(0 if k < branch else j for j in range(n_tasks)) for k in range(n_layers)))


def measure_latency(res: Results, net: Network, model: Any, batch: dict[str, Tensor], args: argparse.Namespace,
                    device: torch.device) -> None:
    """Every tree of the family (``branch_tree``), specialised and hand-built, timed in one interleaved loop,
    so that the latency ratios between trees (c = 1 against c = 0) are as paired as specialised against
    static."""
    n, n_layers = model.n_tasks, model.anchor.n_layers
    model.eval()
    x = batch["image"][:1]
    branches = [0, n_layers] if args.quick else sorted({round(v) for v in np.linspace(0, n_layers, 6)})
    costs = model.node_costs()

    def infer(m: Any, bf16: bool = False) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device, bf16):
                m(x)
        return run

    specs = {b: model.anchor.specialize(branch_tree(n, n_layers, b)).eval() for b in branches}
    candidates: dict[str, Callable[[], None]] = {}
    for b, spec in specs.items():
        candidates[f"spec {b}"] = infer(spec)
        candidates[f"static {b}"] = infer(StaticTree(spec).eval())
    if not args.no_bf16:
        candidates["bf16 0"] = infer(specs[0], True)
    warmup, repeats = latency_repeats(lambda: [f() for f in candidates.values()], args, device)
    t = interleaved_times(candidates, warmup, repeats, device)
    trees = []
    for b, spec in specs.items():
        arch = spec.architecture
        trees.append({"branch": b, "gflops": costs.cost(arch)["flops"] / 1e9, "params": costs.cost(arch)["params"],
                      "specialized_ms": median_ms(t[f"spec {b}"]), "static_ms": median_ms(t[f"static {b}"]),
                      "used_nodes": arch.num_used_nodes(), "architecture": str(arch)})
    for b, c, what in ((0, "c=0", "anchor tree (every stream)"), (n_layers, "c=1", "fully shared tree")):
        gflops = trees[branches.index(b)]["gflops"]
        res.add("static_latency", c, t[f"static {b}"], peak_memory_mb(candidates[f"static {b}"], device),
                note=f"hand-built, {what}, batch 1", gflops=gflops)
        res.add("specialized_latency", c, t[f"spec {b}"], peak_memory_mb(candidates[f"spec {b}"], device),
                vs=("static_latency", c), ref_times=t[f"static {b}"], note=f"specialize(), {what}, {gflops:.3f} GFLOPs",
                gflops=gflops)
    if args.no_bf16:
        res.skip("specialized_latency", "c=0 bf16", "--no_bf16")
    else:
        res.add("specialized_latency", "c=0 bf16", t["bf16 0"], peak_memory_mb(candidates["bf16 0"], device),
                vs=("specialized_latency", "c=0"), ref_times=t["spec 0"], note="autocast bf16")
    measure_compiled_latency(res, net, specs[0], infer, args, device, *latency_repeats(infer(specs[0]), args, device))
    g = np.array([e["gflops"] for e in trees])
    ms = np.array([e["specialized_ms"] for e in trees])
    slope, intercept = np.polyfit(g, ms, 1)
    r2 = 1 - float(((ms - (slope * g + intercept)) ** 2).sum()) / max(float(((ms - ms.mean()) ** 2).sum()), 1e-30)
    latency_ratio = float(np.median([a / b for a, b in zip(t[f"spec {n_layers}"], t["spec 0"])]))  # paired
    flops_ratio = trees[-1]["gflops"] / trees[0]["gflops"]
    res.add("latency_vs_gflops", "trees c=0..1",
            note=f"c=1/c=0: latency {latency_ratio:.2f}x, GFLOPs {flops_ratio:.2f}x; fit {slope:.1f} ms/GFLOP "
                 f"+ {intercept:.2f} ms, R2 {r2:.3f} over {len(trees)} trees",
            trees=trees, latency_ratio=latency_ratio, flops_ratio=flops_ratio, ms_per_gflop=slope,
            intercept_ms=intercept, r2=r2)


def measure_compiled_latency(res: Results, net: Network, spec: Any, infer: Callable[..., Callable[[], None]],
                             args: argparse.Namespace, device: torch.device, warmup: int, repeats: int) -> None:
    reason = compile_skip_reason(net, args, device)
    if reason:
        res.skip("specialized_latency", "c=0 compile", reason)
        return
    try:
        compiled = torch.compile(copy.deepcopy(spec))
        start = time.perf_counter()
        infer(compiled)()
        compile_s = time.perf_counter() - start
        t = interleaved_times({"compiled": infer(compiled), "eager": infer(spec)}, warmup, repeats, device)
        res.add("specialized_latency", "c=0 compile", t["compiled"], peak_memory_mb(infer(compiled), device),
                vs=("specialized_latency", "c=0"), ref_times=t["eager"],
                note=f"first call (compiling) {compile_s:.0f} s",
                compile_s=compile_s, eager_same_loop_ms=median_ms(t["eager"]))
    except Exception as error:  # noqa: BLE001
        res.fail("specialized_latency", "c=0 compile", error)


def measure_switch(res: Results, model: Any, args: argparse.Namespace, device: torch.device) -> None:
    n = model.n_tasks
    model.eval()
    count = 2 if args.quick else 10
    prefs = [p for c in (0.0, 1.0) for p in evaluation_preferences(n, count, c=c, seed=3)]
    spare = evaluation_preferences(n, 1, c=0.5, seed=4)[0]

    def timed_each(fn: Callable[[Any], Any]) -> list[float]:
        fn(spare)  # warm-up
        out = []
        for p in prefs:
            start = time.perf_counter()
            fn(p)
            out.append(time.perf_counter() - start)
        return out

    cold = timed_each(model.specialize)
    res.add("preference_switch", "cold", cold, peak_memory_mb(partial(model.specialize, prefs[0]), device),
            note=f"model.specialize(r, c): hypernets + copying the tree, {len(prefs)} preferences")

    def hypernets(p: Any) -> None:
        with torch.no_grad():
            model.architecture(p)
            model.bn_deltas(p)

    res.add("preference_switch", "hypernets only", timed_each(hypernets),
            peak_memory_mb(partial(hypernets, prefs[0]), device), vs=("preference_switch", "cold"),
            note="edge + weight hypernet forwards")
    cache = SpecializationCache(model)
    for p in prefs:
        cache(p)
    times = [t for _ in range(1 if args.quick else 3) for t in timed_each(cache)]
    res.add("preference_switch", "cached", times, peak_memory_mb(partial(cache, prefs[0]), device),
            vs=("preference_switch", "cold"),
            note=f"SpecializationCache: hypernets + BatchNorm shifts into the kept tree ({len(cache)} trees kept)",
            trees=len(cache))


def measure_loading(res: Results, net: Network, config: dict[str, Any], args: argparse.Namespace,
                    folder: Path, bench_dm: Any) -> None:
    assert net.loading is not None
    crop, batch, raw = net.loading
    if args.quick:
        crop, batch, raw = (64, 64), 2, (48, 64)
    repeats = 2 if args.quick else 5

    def time_loader(dm: Any) -> tuple[list[float], tuple[float | None, str]]:
        dm.setup("fit")
        loader = dm.train_dataloader()
        fetch = lambda: next(iter(loader))  # noqa: E731
        t = interleaved_times({"load": fetch}, 1, repeats, torch.device("cpu"))["load"]
        return t, peak_memory_mb(fetch, torch.device("cpu"))

    step = res.get("anchor_step", "fp32")
    step_ms = step["median_ms"] if step else None
    paper_dm = make_datamodule(net, config, Size(crop, batch), folder / "paper", image=raw, count=batch)
    t, peak = time_loader(paper_dm)
    per_batch = median_ms(t)
    res.add("data_loading", "paper crop, 1 worker", t, peak,
            note=f"{crop[0]}x{crop[1]} crop of {raw[0]}x{raw[1]} images, batch {batch}, "
                 f"{per_batch / batch:.1f} ms per image",
            ms_per_image=per_batch / batch, crop=list(crop), batch=batch)
    t, peak = time_loader(bench_dm)
    bench_ms = median_ms(t)
    workers = math.ceil(bench_ms / step_ms) if step_ms else None
    res.add("data_loading", "bench crop, 1 worker", t, peak, vs=("anchor_step", "fp32"),
            note=(f"workers to keep up with the anchor step: {workers}" if workers else ""),
            workers_to_keep_up=workers)


# ---------------------------------------------------------------------------------------------------------
# deployment: folded BatchNorms, ONNX Runtime, latency against GFLOPs over a preference's trees


DEPLOY_C = 0.5  # the preference of the folded / ONNX rows: the uniform r at this c


def deploy_points(model: Any, quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """The uniform preference's points, ``(label, model keyword arguments)``: c from 0 to 1, or, when the model
    has a measured controller, c = 0 within budgets 1, 0.8, 0.6, 0.5 of the anchor's GFLOPs."""
    n = model.n_tasks
    r = [1.0 / n] * n
    if model.controller is not None:
        budgets = (1.0, 0.5) if quick else (1.0, 0.8, 0.6, 0.5)
        return [(f"budget {b:g}", {"r": r, "c": 0.0, "budget": b, "budget_metric": "flops"}) for b in budgets]
    cs = (0.0, 1.0) if quick else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    return [(f"c={c:g}", {"r": r, "c": c}) for c in cs]


def onnx_runtime(net: Any, example: Tensor, folder: Path) -> tuple[Any | None, str]:
    """``net`` exported to ONNX and loaded in ONNX Runtime with torch's thread count, or None and why not."""
    from dymu.deploy import ExportedModel, MissingDependency, export_model, require

    try:
        require("onnx")
    except MissingDependency as error:
        return None, str(error)
    path = export_model(net, example, folder / "deploy.onnx", "onnx")
    return ExportedModel(path, "onnx", threads=torch.get_num_threads()), ""


def measure_deploy(res: Results, model: Any, batch: dict[str, Tensor], args: argparse.Namespace,
                   device: torch.device, folder: Path) -> None:
    """The served model (``model.specialize(r, c, fold_bn=True)``) against the hand-built static network of its
    tree and against the unfolded specialised model, ONNX Runtime against it (CPU only), at batch 1 and the
    benchmark's batch, fp32; then the uniform preference's trees, folded, timed against the folded anchor tree:
    latency ratio against GFLOPs ratio."""
    from dymu.deploy import LeanNet, count_batchnorms, max_difference

    model.eval()
    n, n_layers = model.n_tasks, model.anchor.n_layers
    inputs = {"batch 1": batch["image"][:1], "large batch": batch["image"]}
    uniform = [1.0 / n] * n
    spec = model.specialize(uniform, DEPLOY_C).eval()
    static = StaticTree(spec).eval()
    folded = model.specialize(uniform, DEPLOY_C, fold_bn=True)
    arch = folded.architecture
    gflops = model.node_costs().cost(arch)["flops"] / 1e9

    def infer(m: Any, x: Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                m(x)
        return run

    errors = {}
    with torch.inference_mode():
        for name, x in inputs.items():
            errors[name] = max_difference(list(folded(x).values()), list(spec(x).values()))["max_rel_error"]
    session, why_not = (None, f"ONNX Runtime runs on CPU, the model on {device}") if device.type != "cpu" else \
        onnx_runtime(folded, batch["image"][:2].cpu(), folder)
    ort_errors = {}
    candidates: dict[str, Callable[[], None]] = {}
    for name, x in inputs.items():
        candidates[f"static|{name}"] = infer(static, x)
        candidates[f"spec|{name}"] = infer(spec, x)
        candidates[f"folded|{name}"] = infer(folded, x)
        if session is not None:
            with torch.inference_mode():
                ort_errors[name] = max_difference(session(x.cpu()), [y.cpu() for y in folded(x).values()])
            candidates[f"ort|{name}"] = partial(session, x.cpu())
    warmup, repeats = latency_repeats(lambda: [f() for f in candidates.values()], args, device)
    t = interleaved_times(candidates, warmup, repeats, device)
    what = f"uniform r, c = {DEPLOY_C:g}: {arch.num_used_nodes()} of {n * n_layers} nodes, {gflops:.3f} GFLOPs"
    for name, x in inputs.items():
        b = int(x.shape[0])
        res.add("deploy_static", name, t[f"static|{name}"], peak_memory_mb(candidates[f"static|{name}"], device),
                note=f"hand-built (BatchNorms kept), {what}, batch {b}", batch=b, gflops=gflops)
        res.add("deploy_specialized", name, t[f"spec|{name}"], peak_memory_mb(candidates[f"spec|{name}"], device),
                vs=("deploy_static", name), ref_times=t[f"static|{name}"], note="model.specialize(r, c)", batch=b)
        vs_unfolded = float(np.median([a / u for a, u in zip(t[f"folded|{name}"], t[f"spec|{name}"])]))
        res.add("deploy_folded", name, t[f"folded|{name}"], peak_memory_mb(candidates[f"folded|{name}"], device),
                vs=("deploy_static", name), ref_times=t[f"static|{name}"],
                note=f"specialize(r, c, fold_bn=True): {vs_unfolded:.2f}x the unfolded one (paired), "
                     f"{folded.folded_batchnorms} BatchNorms folded",
                batch=b, vs_unfolded=vs_unfolded, max_rel_error_vs_unfolded=errors[name],
                folded_batchnorms=folded.folded_batchnorms, batchnorms_left=count_batchnorms(folded))
        if session is None:
            res.skip("deploy_onnxruntime", name, why_not)
        else:
            err = ort_errors[name]["max_rel_error"]
            res.add("deploy_onnxruntime", name, t[f"ort|{name}"], peak_memory_mb(candidates[f"ort|{name}"], device),
                    vs=("deploy_folded", name), ref_times=t[f"folded|{name}"],
                    note=f"the folded model as ONNX, {torch.get_num_threads()} intra-op thread(s); error {err:.1g}",
                    batch=b, max_rel_error=err)

    # latency against GFLOPs over the uniform preference's trees (each distinct tree once), folded, against the
    # folded anchor tree, all in one interleaved loop per batch size
    costs = model.node_costs()
    anchor_arch = Architecture.anchor(n, n_layers)
    points = deploy_points(model, args.quick)
    nets: dict[Architecture, Any] = {anchor_arch: LeanNet.create(model.anchor.specialize(anchor_arch), fold_bn=True)}
    point_trees = []
    for label, kwargs in points:
        lean = model.specialize(**kwargs, fold_bn=True)
        nets.setdefault(lean.architecture, lean)
        point_trees.append((label, lean.architecture))
    keys = {a: f"tree {i}" for i, a in enumerate(nets)}
    anchor_flops = costs.cost(anchor_arch)["flops"]
    for name, x in inputs.items():
        cand = {keys[a]: infer(m, x) for a, m in nets.items()}
        warmup, repeats = latency_repeats(lambda cand=cand: [f() for f in cand.values()], args, device)
        t = interleaved_times(cand, warmup, repeats, device)
        ref = t[keys[anchor_arch]]
        trees = []
        for label, a in point_trees:
            latency_ratio = float(np.median([v / w for v, w in zip(t[keys[a]], ref)]))  # paired
            flops_ratio = costs.cost(a)["flops"] / anchor_flops
            trees.append({"point": label, "architecture": str(a), "gflops": costs.cost(a)["flops"] / 1e9,
                          "flops_ratio": flops_ratio, "latency_ratio": latency_ratio,
                          "off": latency_ratio / flops_ratio - 1, "median_ms": median_ms(t[keys[a]])})
        worst = max(trees, key=lambda e: abs(e["off"]))
        g = np.array([costs.cost(a)["flops"] / 1e9 for a in nets])
        ms = np.array([median_ms(t[keys[a]]) for a in nets])
        slope, intercept = np.polyfit(g, ms, 1) if len(nets) > 1 else (float("nan"), float("nan"))
        res.add("deploy_latency_vs_gflops", f"uniform r, {name}",
                note=f"batch {int(x.shape[0])}, {len(nets) - 1} distinct tree(s) of {len(points)} points against the "
                     f"anchor ({median_ms(ref):.2f} ms); worst {worst['point']}: latency {worst['latency_ratio']:.2f}x, "
                     f"GFLOPs {worst['flops_ratio']:.2f}x ({100 * worst['off']:+.0f} %); fit {slope:.1f} ms/GFLOP + "
                     f"{intercept:.2f} ms",
                batch=int(x.shape[0]), trees=trees, worst_off=worst["off"], anchor_ms=median_ms(ref),
                distinct_trees=len(nets) - 1, ms_per_gflop=float(slope), intercept_ms=float(intercept))


# ---------------------------------------------------------------------------------------------------------
# sweep trials batched in one process (benchmarks/trials.py, in child processes)


def measure_trials(res: Results, net: Network, args: argparse.Namespace, device: torch.device) -> None:
    """K = 1, 6, 24 trials of the edge and weight stages batched against their steps one after another, then
    K = 6 of the edge stage again with the freed memory kept (``retain_freed_memory``); each set in a child
    process, so that no allocator setting reaches the other rows."""
    for kept in (False, True):
        for r in measure_in_child(net, args.quick, device, kept):
            peak = (r["peak"][0], r["peak"][1]) if r.get("peak") else None
            res.add(r["row"], r["variant"], r["times"], peak, vs=tuple(r["vs"]) if r["vs"] else None,
                    ref_times=r["ref_times"], note=r["note"], **r["extra"])


# ---------------------------------------------------------------------------------------------------------
# one network, targets, output


def measure_network(net: Network, args: argparse.Namespace, device: torch.device, folder: Path) -> Results:
    size = net.quick if args.quick else net.paper if args.paper_size else net.bench
    config = net.read_config(args.quick)
    res = Results(net.name)
    dm = make_datamodule(net, config, size, folder / net.name)
    tasks = dm.tasks
    batch = first_batch(dm, device)
    edge_args, _, _ = edge_settings(config, len(tasks))
    model = build_model(config, tasks, dm.input_shape, edge_args).to(device)
    print(f"[bench] {net.name}: {len(tasks)} tasks, {model.anchor.n_layers} layers, input "
          f"{tuple(batch['image'].shape)}", file=sys.stderr, flush=True)
    sections: list[tuple[str, Callable[[], None], list[tuple[str, str]]]] = [
        ("training", lambda: measure_training(res, net, model, tasks, batch, config, args, device), TRAIN_ROWS),
        ("evaluation", lambda: measure_evaluation(res, model, tasks, batch, args, device), OTHER_ROWS[:1]),
        ("latency", lambda: measure_latency(res, net, model, batch, args, device), OTHER_ROWS[1:8]),
        ("switch", lambda: measure_switch(res, model, args, device), OTHER_ROWS[8:]),
    ]
    sections.append(("deploy", lambda: measure_deploy(res, model, batch, args, device, folder / net.name),
                     DEPLOY_ROWS))
    if net.loading is not None:
        sections.append(("loading", lambda: measure_loading(res, net, config, args, folder / net.name, dm),
                         LOADING_ROWS))
    if net.name in TRIALS_NETWORKS or args.trials_all or device.type == "cuda":
        sections.append(("trials", lambda: measure_trials(res, net, args, device), TRIAL_ROWS))
    for name, run, rows in sections:
        if args.sections and name not in args.sections:
            continue
        start = time.perf_counter()
        try:
            run()
        except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
            traceback.print_exc()
            for row in rows:
                if res.get(*row) is None:
                    res.fail(*row, error)
        print(f"[bench] {net.name}: {name} {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    res.fill_ratios()
    return res


def targets(results: list[Results], device: torch.device) -> list[dict[str, Any]]:
    """The targets of docs/performance.md, per network, each met or missed."""
    out = []

    def add(network: str, name: str, value: float | None, limit: str, met: bool | None, detail: str) -> None:
        out.append({"network": network, "target": name, "value": value, "limit": limit,
                    "status": "n/a" if met is None or value is None else "met" if met else "missed",
                    "detail": detail})

    for res in results:
        step, singles = res.get("anchor_step", "fp32"), res.get("single_task_nets_step", "fp32")
        ratio = step["ratio"] if step else None
        add(res.network, "N-stream step / N networks one after another", ratio, "<= 1.0" +
            (" (CPU)" if device.type == "cpu" else ""), ratio is not None and ratio <= 1.0,
            f"{step['median_ms']:.1f} vs {singles['median_ms']:.1f} ms" if step and singles and step["median_ms"]
            and singles["median_ms"] else "")
        edge = res.get("edge_step", "fp32")
        ratio = edge["ratio"] if edge else None
        add(res.network, "edge step / anchor forward+backward", ratio, "<= 1.3", ratio is not None and ratio <= 1.3,
            "")
        worst = [r["ratio"] for r in (res.get("specialized_latency", "c=0"), res.get("specialized_latency", "c=1"))
                 if r and r["ratio"] is not None]
        value = max(worst) if worst else None
        add(res.network, "specialised / hand-built static latency (worse of c=0, c=1)", value, "<= 1.05",
            value is not None and value <= 1.05, "")
        fit = res.get("latency_vs_gflops", "trees c=0..1")
        if fit and fit["status"] == "ok":
            x = fit["extra"]
            off = x["latency_ratio"] / x["flops_ratio"] - 1
            add(res.network, "c=1/c=0 latency ratio vs GFLOPs ratio", off, "|.| <= 0.10", abs(off) <= 0.10,
                f"latency {x['latency_ratio']:.3f}x, GFLOPs {x['flops_ratio']:.3f}x")
        else:
            add(res.network, "c=1/c=0 latency ratio vs GFLOPs ratio", None, "|.| <= 0.10", None, "")
        ratios = [r["ratio"] for r in (res.get("deploy_folded", v) for v in DEPLOY_BATCHES)
                  if r and r["status"] == "ok" and r["ratio"] is not None]
        value = max(ratios) if ratios else None
        add(res.network, "folded / hand-built static latency (worse of batch 1, large batch)", value,
            "<= 0.9" + (" (CPU)" if device.type == "cpu" else ""), value is not None and value <= 0.9,
            ", ".join(f"{v}: {r['ratio']:.2f}" for v in DEPLOY_BATCHES
                      if (r := res.get("deploy_folded", v)) and r["ratio"] is not None))
        for variant in DEPLOY_BATCHES:
            fit = res.get("deploy_latency_vs_gflops", f"uniform r, {variant}")
            x = fit["extra"] if fit and fit["status"] == "ok" else None
            worst = max(x["trees"], key=lambda e: abs(e["off"])) if x else None
            add(res.network, f"uniform-r trees: latency ratio vs GFLOPs ratio to the anchor, worst tree, {variant}",
                x["worst_off"] if x else None, "|.| <= 0.05", x is not None and abs(x["worst_off"]) <= 0.05,
                f"{worst['point']}: latency {worst['latency_ratio']:.3f}x, GFLOPs {worst['flops_ratio']:.3f}x"
                if worst else "")
        captured = res.get("edge_step", "captured compile")
        value = captured["ratio"] if captured and captured["status"] == "ok" else None
        gpu = device.type == "cuda"
        add(res.network, "captured (compiled) edge step / eager edge step", value, "<= 0.33 (GPU)" if gpu else
            "<= 1.0 (CPU)", value is not None and value <= (1 / 3 if gpu else 1.0),
            f"compiling {captured['extra']['compile_s']:.0f} s, mode {captured['extra']['mode']}"
            if value is not None else "")
        batched = res.get("trials_edge_step", f"batched K={KEPT_K}")
        value = batched["extra"].get("throughput_ratio") if batched and batched["status"] == "ok" else None
        gpu = device.type == "cuda"
        add(res.network, f"K = {KEPT_K} edge trials batched: throughput / {KEPT_K} separate steps", value,
            ">= 4 (GPU)" if gpu else ">= 1.5 (CPU)", value is not None and value >= (4.0 if gpu else 1.5),
            f"{batched['extra']['trials_per_s']:.1f} trials/s batched" + (
                f"; with the freed memory kept {kept['extra']['throughput_ratio']:.2f}x"
                if (kept := res.get("trials_edge_step", f"batched K={KEPT_K}, malloc kept")) and kept["status"] == "ok"
                else "") if value is not None else "")
        cached = res.get("preference_switch", "cached")
        value = cached["median_ms"] if cached else None
        add(res.network, "cached preference switch (ms)", value, "< 10" + (" (CPU)" if device.type == "cpu" else ""),
            value is not None and value < 10, "")
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2g}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['torch_threads']} torch "
             f"thread(s), torch {m['torch']}, device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else "")
             + f"; load average at start {', '.join(f'{v:.2f}' for v in m['load_average_at_start'] or [])}; "
             f"sizes: {report['settings']['sizes']}.", "",
             "| network | row | variant | median ms | vs | ratio | peak MB | note |",
             "|---|---|---|---:|---|---:|---:|---|"]
    for r in report["rows"]:
        status = "" if r["status"] == "ok" else f"**{r['status']}** "
        vs = f"{r['vs'][0]} {r['vs'][1]}" if r["vs"] else ""
        lines.append(f"| {r['network']} | {r['row']} | {r['variant']} | {_fmt(r['median_ms'], 2)} | {vs} | "
                     f"{_fmt(r['ratio'], 2)} | {_fmt(r['peak_mb'])} | {status}{r['note']} |")
    lines += ["", "| network | target | value | limit | status | detail |", "|---|---|---:|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['network']} | {t['target']} | {_fmt(t['value'], 3)} | {t['limit']} | {t['status']} | "
                     f"{t['detail']} |")
    return "\n".join(lines)


def merged(old: dict[str, Any], new: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``old`` with the rows that ``new`` measured replaced by ``new``'s (in place; rows ``old`` lacks come
    last in their network's block, network order of ``NETWORKS``), and the targets computed again from the
    merged rows."""
    def key(r: dict[str, Any]) -> tuple[str, str, str]:
        return r["network"], r["row"], r["variant"]

    fresh = {key(r): r for r in new["rows"]}
    rows = [fresh.pop(key(r), r) for r in old["rows"]] + list(fresh.values())
    order = {n.name: i for i, n in enumerate(NETWORKS)}
    rows.sort(key=lambda r: order.get(r["network"], len(order)))  # stable within a network
    settings = {**new["settings"], "runs": [*old["settings"].get("runs", []), *new["settings"]["runs"]],
                "sizes": {**old["settings"].get("sizes", {}), **new["settings"]["sizes"]}}
    return {**new, "settings": settings, "rows": rows, "targets": targets(results_of(rows), device)}


def results_of(rows: list[dict[str, Any]]) -> list[Results]:
    """The rows grouped by network, as ``Results`` (what ``targets`` reads)."""
    out: dict[str, Results] = {}
    for r in rows:
        out.setdefault(r["network"], Results(r["network"])).rows.append(r)
    return list(out.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few iterations: the CI smoke mode")
    parser.add_argument("--paper_size", action="store_true", help="the paper's input and batch sizes (a GPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="a folder for <machine>.json and <machine>.md, or a .json file path")
    parser.add_argument("--networks", nargs="+", choices=[n.name for n in NETWORKS],
                        help="only these networks (default: all)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, OMP_NUM_THREADS)")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no_bf16", action="store_true", help="skip the bf16 rows")
    parser.add_argument("--compile_all", action="store_true",
                        help="the torch.compile rows of every network on CPU too (by default only the small ones)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS,
                        help="only these sections' rows (default: all); with --update the others are kept")
    parser.add_argument("--trials_all", action="store_true",
                        help="the trials rows for every network on CPU too (by default: " +
                             ", ".join(TRIALS_NETWORKS) + ")")
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured rows in an existing result file (the others, from an "
                             "earlier run, are kept; settings.runs says which run measured which)")
    args = parser.parse_args(argv)
    if args.quick and args.paper_size:
        parser.error("--quick and --paper_size exclude each other")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is available")
    machine = machine_description(device)
    networks = [n for n in NETWORKS if not args.networks or n.name in args.networks]
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="dymu-bench-") as folder:
        for net in networks:
            results.append(measure_network(net, args, device, Path(folder)))
    sizes = {n.name: (lambda s: f"{'x'.join(map(str, s.crop)) if s.crop else 'data size'} batch {s.batch}")(
        n.quick if args.quick else n.paper if args.paper_size else n.bench) for n in networks}
    run = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.perf_counter() - start))),
           "networks": [n.name for n in networks], "sections": args.sections or list(SECTIONS),
           "load_average_at_start": machine["load_average_at_start"],
           "wall_s": time.perf_counter() - start}
    report = {"machine": machine,
              "settings": {"quick": args.quick, "paper_size": args.paper_size, "device": str(device),
                           "sizes": sizes, "compile": not args.no_compile, "bf16": not args.no_bf16,
                           "wall_s": run["wall_s"], "runs": [run]},
              "rows": [r for res in results for r in res.rows],
              "targets": targets(results, device)}
    out = Path(args.out)
    json_path = out if out.suffix == ".json" else out / f"{machine_name(machine)}{'-quick' if args.quick else ''}.json"
    if args.update and json_path.exists():
        report = merged(json.loads(json_path.read_text()), report, device)
    table = markdown(report)
    print(table)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    json_path.with_suffix(".md").write_text(table + "\n")
    print(f"\n[bench] wrote {json_path} and {json_path.with_suffix('.md').name} in {report['settings']['wall_s']:.0f} s",
          file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
