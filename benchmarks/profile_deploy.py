"""Where the served model's time goes: a per-op profile (``torch.profiler``) of the deploy rows' networks.

For one benchmark network (the sizes of ``benchmarks/run.py``), the uniform preference at c = 0.5 as the deploy
rows build it: the hand-built static network (BatchNorms kept), the unfolded specialised model and the folded
one (``specialize(r, c, fold_bn=True)``), each run ``--calls`` times under the profiler at each batch size.
Per network and batch it prints the milliseconds per call by op group (convolutions, BatchNorm, elementwise,
resampling and concatenation, the rest), the op count per call, and the wall time per call outside the
profiler (paired, interleaved rounds, as the benchmark times them). With ``--trees`` it profiles the uniform
preference's folded trees from c = 0 to 1 (as ``deploy_latency_vs_gflops`` does) and prints each group's time
against the tree's GFLOPs, relative to the anchor tree.

    OMP_NUM_THREADS=1 python benchmarks/profile_deploy.py --network nyuv2 --batches 1 4 [--trees] [--json F]

Times under the profiler include its own per-op overhead (a few microseconds per op); the wall times are
measured without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.measure import interleaved_times  # noqa: E402
from benchmarks.networks import NETWORKS, build_model, edge_settings, first_batch, make_datamodule  # noqa: E402
from benchmarks.static import StaticTree  # noqa: E402
from dymu.search_space import Architecture  # noqa: E402

DEPLOY_C = 0.5  # benchmarks/run.py's DEPLOY_C

GROUPS = {
    "conv": ("aten::convolution", "aten::_convolution", "aten::conv2d", "aten::mkldnn_convolution",
             "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::slow_conv_dilated2d",
             "aten::_nnpack_available", "aten::_nnpack_spatial_convolution", "aten::linear", "aten::addmm",
             "aten::mm", "aten::matmul"),
    "batchnorm": ("aten::batch_norm", "aten::_batch_norm_impl_index", "aten::native_batch_norm",
                  "aten::_native_batch_norm_legit_no_training", "aten::_native_batch_norm_legit"),
    "elementwise": ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::clamp",
                    "aten::clamp_", "aten::hardtanh", "aten::hardtanh_",
                    "aten::add", "aten::add_", "aten::mul", "aten::sigmoid", "aten::hardsigmoid", "aten::hardswish",
                    "aten::hardswish_", "aten::gelu", "aten::tanh", "aten::copy_", "aten::fill_", "aten::zero_"),
    "resample/cat": ("aten::upsample_bilinear2d", "aten::upsample_nearest2d", "aten::_upsample_bilinear2d_aa",
                     "aten::cat", "aten::adaptive_avg_pool2d", "aten::mean", "aten::max_pool2d",
                     "aten::max_pool2d_with_indices", "aten::avg_pool2d", "aten::interpolate"),
}
GROUP_OF = {op: group for group, ops in GROUPS.items() for op in ops}


def op_profile(fn: Callable[[], Any], calls: int) -> dict[str, Any]:
    """Self CPU time (ms per call) and count per call of each top-level op, grouped."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        by_op[event.key][0] += event.self_cpu_time_total / 1e3 / calls
        by_op[event.key][1] += event.count / calls
    groups: dict[str, float] = defaultdict(float)
    for op, (ms, _) in by_op.items():
        groups[GROUP_OF.get(op, "other ops")] += ms
    top_level = sum(e.count for e in prof.events() if e.cpu_parent is None) / calls  # ops called from Python
    return {"groups_ms": dict(groups), "total_ms": sum(groups.values()), "top_level_ops": top_level,
            "ops": {op: {"ms": ms, "count": n} for op, (ms, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])}}


CONV_KERNELS = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::slow_conv_dilated2d",
                "aten::_nnpack_spatial_convolution", "aten::addmm", "aten::mm")


def conv_rates(fn: Callable[[], Any], calls: int) -> dict[str, dict[str, float]]:
    """Per convolution kernel that PyTorch picked (oneDNN, im2col + GEMM, the dilated loop) and kernel size: its
    share of the FLOPs and of the convolutions' time, and its GFLOP/s (``torch.profiler``'s ``with_flops``)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    rows: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for event in prof.events():
        if event.name not in ("aten::conv2d", "aten::linear") or not event.flops:
            continue
        kernels, stack = [], list(event.cpu_children)
        while stack:
            child = stack.pop()
            kernels += [child.name] if child.name in CONV_KERNELS else []
            stack += child.cpu_children
        shapes = event.input_shapes[1] if len(event.input_shapes) > 1 else []
        size = "x".join(map(str, shapes[2:])) if len(shapes) > 2 else "linear"
        key = f"{(kernels or ['?'])[0].removeprefix('aten::')} {size}"
        rows[key][0] += event.flops / calls
        rows[key][1] += event.cpu_time_total / 1e3 / calls
        rows[key][2] += 1 / calls
    flops, ms = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
    return {k: {"flops_share": f / flops, "time_share": t / ms, "gflop_per_s": f / t / 1e6, "calls": n}
            for k, (f, t, n) in sorted(rows.items(), key=lambda kv: -kv[1][1])}


def wall_ms(candidates: dict[str, Callable[[], Any]], seconds: float) -> dict[str, list[float]]:
    """Wall ms per call of each candidate per round, interleaved rounds for about ``seconds``."""
    for fn in candidates.values():
        fn()
    start = time.perf_counter()
    for fn in candidates.values():
        fn()
    once = time.perf_counter() - start
    rounds = max(5, min(200, int(seconds / max(once, 1e-6))))
    times = interleaved_times(candidates, 3, rounds, torch.device("cpu"))
    return {name: [1e3 * v for v in t] for name, t in times.items()}


def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a / b``."""
    return statistics.median(x / y for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="nyuv2", choices=[n.name for n in NETWORKS])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--calls", type=int, default=20, help="calls of each network under the profiler")
    parser.add_argument("--seconds", type=float, default=10.0, help="wall-time loop per batch size")
    parser.add_argument("--trees", action="store_true", help="also the uniform preference's trees, c = 0 to 1")
    parser.add_argument("--json", default=None, help="write the numbers to this file")
    args = parser.parse_args(argv)
    net = next(n for n in NETWORKS if n.name == args.network)
    config = net.read_config(False)
    with tempfile.TemporaryDirectory(prefix="dymu-profile-") as folder:
        dm = make_datamodule(net, config, net.bench, Path(folder) / net.name)
        batch = first_batch(dm, torch.device("cpu"))
    edge_args, _, _ = edge_settings(config, len(dm.tasks))
    model = build_model(config, dm.tasks, dm.input_shape, edge_args).eval()
    n = model.n_tasks
    uniform = [1.0 / n] * n
    spec = model.specialize(uniform, DEPLOY_C).eval()
    nets = {"hand-built": StaticTree(spec).eval(), "unfolded": spec,
            "folded": model.specialize(uniform, DEPLOY_C, fold_bn=True)}
    report: dict[str, Any] = {"network": net.name, "threads": torch.get_num_threads(), "c": DEPLOY_C,
                              "tree": str(spec.architecture), "batches": {}}
    print(f"{net.name}: uniform r, c = {DEPLOY_C}, tree {spec.architecture}, {torch.get_num_threads()} thread(s)")
    for b in args.batches:
        x = batch["image"][:1].expand(b, *batch["image"].shape[1:]).contiguous()

        def call(m: Any, x: torch.Tensor = x) -> Callable[[], Any]:
            def run() -> None:
                with torch.inference_mode():
                    m(x)
            return run

        rounds = wall_ms({k: call(m) for k, m in nets.items()}, args.seconds)
        walls = {k: statistics.median(t) for k, t in rounds.items()}
        ratios = {"folded / hand-built": paired(rounds["folded"], rounds["hand-built"]),
                  "folded / unfolded": paired(rounds["folded"], rounds["unfolded"])}
        profiles = {k: op_profile(call(m), args.calls) for k, m in nets.items()}
        report["batches"][b] = {"paired_wall_ratios": ratios,
                                **{k: {"wall_ms": walls[k], **profiles[k]} for k in nets}}
        groups = [*GROUPS, "other ops"]
        print(f"\nbatch {b}: ms per call (self CPU time under the profiler, by op group; ops: top-level ops per "
              f"call) and median wall ms without it")
        print(f"{'network':<12}{'wall':>8}{'profiled':>10}" + "".join(f"{g:>14}" for g in groups) + f"{'ops':>7}")
        for k, p in profiles.items():
            print(f"{k:<12}{walls[k]:>8.2f}{p['total_ms']:>10.2f}"
                  + "".join(f"{p['groups_ms'].get(g, 0.0):>14.2f}" for g in groups) + f"{p['top_level_ops']:>7.0f}")
        print("  paired wall ratios (median over rounds): "
              + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        for k in ("unfolded", "folded"):
            top = list(profiles[k]["ops"].items())[:6]
            print(f"  {k} top ops: " + ", ".join(f"{op} {v['ms']:.2f} ms x{v['count']:.0f}" for op, v in top))
    if args.trees:
        from benchmarks.run import deploy_points
        from dymu.deploy import LeanNet

        costs = model.node_costs()
        anchor = Architecture.anchor(n, model.anchor.n_layers)
        trees = {anchor: LeanNet.create(model.anchor.specialize(anchor), fold_bn=True)}
        for _, kwargs in deploy_points(model, False):
            lean = model.specialize(**kwargs, fold_bn=True)
            trees.setdefault(lean.architecture, lean)
        anchor_flops = costs.cost(anchor)["flops"]
        report["trees"] = {}
        for b in args.batches:
            x = batch["image"][:1].expand(b, *batch["image"].shape[1:]).contiguous()

            def call_tree(m: Any, x: torch.Tensor = x) -> Callable[[], Any]:
                def run() -> None:
                    with torch.inference_mode():
                        m(x)
                return run

            rounds = wall_ms({str(a): call_tree(m) for a, m in trees.items()}, args.seconds)
            rows = []
            for a, m in trees.items():
                p = op_profile(call_tree(m), args.calls)
                rows.append({"tree": str(a), "flops_ratio": costs.cost(a)["flops"] / anchor_flops,
                             "wall_ms": statistics.median(rounds[str(a)]),
                             "wall_ratio": paired(rounds[str(a)], rounds[str(anchor)]), **p})
            ref = rows[0]
            print(f"\nbatch {b}: the uniform preference's folded trees against the anchor tree (ratios; wall paired)")
            print(f"{'GFLOPs':>8}{'wall':>8}{'off':>7}{'conv':>8}{'non-conv':>10}{'ops':>6}  tree")
            for r in rows:
                conv = r["groups_ms"].get("conv", 0.0)
                rest = r["total_ms"] - conv
                ref_conv = ref["groups_ms"].get("conv", 0.0)
                print(f"{r['flops_ratio']:>8.3f}{r['wall_ratio']:>8.3f}{r['wall_ratio'] / r['flops_ratio'] - 1:>+7.1%}"
                      f"{conv / ref_conv:>8.3f}{rest / (ref['total_ms'] - ref_conv):>10.3f}{r['top_level_ops']:>6.0f}"
                      f"  {r['tree']}")
            print(f"  anchor tree: {ref['wall_ms']:.2f} ms wall, conv {ref['groups_ms'].get('conv', 0.0):.2f} ms of "
                  f"{ref['total_ms']:.2f} ms profiled")
            rates = conv_rates(call_tree(trees[anchor]), max(2, args.calls // 4))
            print("  the anchor tree's convolutions by the kernel PyTorch picked and kernel size: "
                  "share of FLOPs, share of conv time, GFLOP/s")
            for k, v in rates.items():
                print(f"    {k:<28}{v['flops_share']:>7.1%}{v['time_share']:>7.1%}{v['gflop_per_s']:>8.1f}"
                      f"  ({v['calls']:.0f} calls)")
            report["trees"][f"{b} conv rates"] = rates
            report["trees"][b] = [{k: v for k, v in r.items() if k != "ops"} for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
