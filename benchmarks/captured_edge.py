"""The captured edge step against the eager one (issue 20, item 2) at more rounds than ``benchmarks/run.py``'s row
``edge_step | captured compile``, at the benchmark's batch (32) and the quickstart edge stage's own (8), with the
break-even step count (compile seconds / seconds saved per step) and where each step's time goes (the profiler's
top operators).

``OMP_NUM_THREADS=1 python benchmarks/captured_edge.py [--rounds 40] [--batches 32 8] [--device cpu]``; prints a
Markdown table. Compile times are cold (inductor's caches off, as in ``run.py``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.measure import interleaved_times, median_ms  # noqa: E402
from benchmarks.networks import NETWORKS, Size, build_model, edge_settings, first_batch, make_datamodule  # noqa: E402
from benchmarks.networks import training_preferences as draw_preferences  # noqa: E402
from benchmarks.run import stage_optimizer, step_fn  # noqa: E402
from dymu.captured import CapturedStep, resolve_compile_step  # noqa: E402
from dymu.training import captured_edge_loss, edge_search_loss, preference_tensors  # noqa: E402


def top_ops(fn, device: torch.device, count: int = 6) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    launches = sum(e.count for e in events)
    parts = [f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:count]]
    return f"{launches // 3} ops/step; " + ", ".join(parts)


def measure(batch_size: int, rounds: int, device: torch.device, folder: Path) -> dict:
    net = next(n for n in NETWORKS if n.name == "quickstart")
    config = net.read_config(False)
    dm = make_datamodule(net, config, Size(net.bench.crop, batch_size), folder)
    tasks = dm.tasks
    batch = first_batch(dm, device)
    edge_args, regularizer, groups = edge_settings(config, len(tasks))
    model = build_model(config, tasks, dm.input_shape, edge_args).to(device)
    model.requires_grad_(False)
    model.anchor.eval()
    model.edge_hypernet.requires_grad_(True)
    n = len(tasks)
    scales = torch.tensor([t.scale for t in tasks], device=device)
    prefs = draw_preferences(n, groups, seed=1)
    affinity = torch.full((n, n), 0.5, device=device).fill_diagonal_(1.0)

    eager_opt = stage_optimizer(config, "edge", model.edge_hypernet.parameters())
    eager = step_fn(lambda: edge_search_loss(model.anchor, model.edge_hypernet, tasks, scales, batch, prefs, 1.0,
                                             affinity, regularizer)["loss"], eager_opt, device)
    copy_ = copy.deepcopy(model)
    mode = resolve_compile_step("auto", device) if device.type == "cuda" else "default"
    captured = CapturedStep(captured_edge_loss, mode, "captured edge")

    def objective(fn) -> torch.Tensor:
        r, c = preference_tensors(prefs, "cpu")
        out = fn(copy_.anchor, copy_.edge_hypernet, tasks, scales, batch, r.to(device), c.to(device),
                 torch.tensor(1.0, device=device), affinity, regularizer)
        if out is None:
            raise RuntimeError("the captured step did not compile (see the warning)")
        return out["loss"]

    opt_c, opt_u = (stage_optimizer(config, "edge", copy_.edge_hypernet.parameters()) for _ in range(2))
    compiled = step_fn(lambda: objective(captured), opt_c, device)
    uncompiled = step_fn(lambda: objective(captured_edge_loss), opt_u, device)  # the static rewrite, eager
    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    t = interleaved_times({"eager": eager, "captured eager": uncompiled, "captured compiled": compiled}, 3, rounds,
                          device)
    ratio = float(np.median([a / b for a, b in zip(t["captured compiled"], t["eager"])]))
    ratio_u = float(np.median([a / b for a, b in zip(t["captured eager"], t["eager"])]))
    saved = median_ms(t["eager"]) - median_ms(t["captured compiled"])
    return {"batch": batch_size, "groups": groups, "mode": mode, "eager_ms": median_ms(t["eager"]),
            "uncompiled_ms": median_ms(t["captured eager"]), "compiled_ms": median_ms(t["captured compiled"]),
            "ratio": ratio, "ratio_uncompiled": ratio_u, "compile_s": compile_s,
            "break_even_steps": compile_s / (saved / 1e3) if saved > 0 else None,
            "eager_profile": top_ops(eager, device), "compiled_profile": top_ops(compiled, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batches:
            rows.append(measure(b, args.rounds, device, Path(tmp) / f"b{b}"))
            print(f"[captured] batch {b} done", file=sys.stderr, flush=True)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| batch (groups) | mode | eager ms | static rewrite, eager ms | compiled ms | compiled / eager (paired) | "
          "rewrite / eager | compiling s | break-even steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        even = f"{r['break_even_steps']:.0f}" if r["break_even_steps"] else "never"
        print(f"| {r['batch']} ({r['groups']}) | {r['mode']} | {r['eager_ms']:.1f} | {r['uncompiled_ms']:.1f} | "
              f"{r['compiled_ms']:.1f} | {r['ratio']:.2f} | {r['ratio_uncompiled']:.2f} | {r['compile_s']:.0f} | "
              f"{even} |")
    for r in rows:
        print(f"\nbatch {r['batch']} eager: {r['eager_profile']}\nbatch {r['batch']} compiled: {r['compiled_profile']}")


if __name__ == "__main__":
    main()
