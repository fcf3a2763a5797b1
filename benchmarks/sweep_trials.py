"""End-to-end wall time of a local sweep: ``dymu sweep --batch_trials K`` against the same trials one by one (issue
20, item 1).

One parent run (the quickstart's config with the Gumbel search, its anchor shortened: the anchor is trained once
and is not timed) is copied twice; the same sweep plan (K trials: tau x seed) runs in one copy batched in one
process and in the other one by one (each stage a subprocess, as ``dymu sweep`` without the flag runs it). Both
times include everything a sweep does per trial: building the stages, training, checkpoints, the evaluation, the
summary. Also reported: the stages' training seconds alone (the checkpoints' ``Timer`` seconds; a batched group's
seconds are shared by its trials). Run with one thread::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m benchmarks.sweep_trials --out /tmp/sweep_bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a new folder for the runs")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--edge_steps", type=int, default=200)
    parser.add_argument("--weight_steps", type=int, default=100)
    parser.add_argument("--anchor_steps", type=int, default=100)
    parser.add_argument("--order", choices=("batched_first", "alone_first"), default="batched_first")
    args = parser.parse_args(argv)

    from stages.pipeline import load_pipeline_config
    from stages.runner import run_pipeline
    from stages.stage_cli import train_seconds
    from stages.sweep import run_sweep

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["edge.model.search=gumbel", f"edge.trainer.max_steps={args.edge_steps}",
                 f"edge.trainer.val_check_interval={args.edge_steps}",
                 f"edge.checkpoint.every_n_train_steps={args.edge_steps}",
                 f"weight.trainer.max_steps={args.weight_steps}", f"weight.trainer.val_check_interval={args.weight_steps}",
                 f"anchor.trainer.max_steps={args.anchor_steps}", f"anchor.trainer.val_check_interval={args.anchor_steps}",
                 "anchor.model.shared_warmup_steps=50",
                 "logger={class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: .}}"]
    config = load_pipeline_config(ROOT / "configs" / "quickstart.yaml", overrides)
    parent = out / "parent"
    if not (parent / "affinity.json").is_file():
        run_pipeline(config, parent, stages=("affinity",))
    seeds = (args.trials + 2) // 3
    sweep = out / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"method": "grid", "parameters": {
        "edge.model.tau": {"values": [0.1, 0.2, 0.3]}, "seed_everything": {"values": list(range(seeds))}}}))
    times = {}
    order = ("batched", "alone") if args.order == "batched_first" else ("alone", "batched")
    for mode in order:
        run_dir = out / mode
        if run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(parent, run_dir)
        start = time.perf_counter()
        results = run_sweep(sweep, run_dir, trials=args.trials,
                            batch_trials=args.trials if mode == "batched" else None)
        wall = time.perf_counter() - start
        stage_seconds = {}
        for stage in ("edge", "weight"):
            seconds = []
            for res in results:
                ckpt = torch.load(run_dir / "sweeps" / res["name"] / stage / "final.ckpt", map_location="cpu",
                                  weights_only=True, mmap=True)
                seconds.append(train_seconds(ckpt) or 0.0)
            stage_seconds[stage] = sum(seconds)
        times[mode] = {"wall_s": wall, "train_s": stage_seconds, "trials": len(results)}
        print(f"[sweep bench] {mode}: {wall:.1f} s wall for {len(results)} trials; training seconds {stage_seconds}",
              flush=True)
    ratio = times["alone"]["wall_s"] / times["batched"]["wall_s"]
    report = {"trials": args.trials, "edge_steps": args.edge_steps, "weight_steps": args.weight_steps,
              "order": list(order), "threads": torch.get_num_threads(), "times": times,
              "wall_ratio_alone_over_batched": ratio}
    (out / "result.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
