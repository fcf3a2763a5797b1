"""Sweep trials with a long edge stage on an accelerator, several at once, sized to a time budget.

Used for docs/controllability.md ("Round 13: the paper's step count"): the edge stage of the quickstart is
3000 steps; the paper's is 30K. This script runs a sweep file's trials (`dymu trial`) in parallel
processes on one machine, with the edge stage's `max_steps` chosen so that the edge stage of every trial
fits `--edge_budget_s` seconds (measured first: every trial's edge stage runs `--calibrate_steps` steps
concurrently, and its recorded training time gives the seconds per step), capped at `--max_steps`.

    python docs/scripts/long_edge.py --parent runs/ctl2 \
        --sweep docs/sweeps/controllability/long_ours.yaml \
        --sweep docs/sweeps/controllability/long_affine.yaml --accelerator gpu --edge_budget_s 300

The parent run is copied to `--work` (its anchor and affinity are reused; its pipeline config gets the
accelerator and a CSV logger), and `--out` receives `long_edge.tar.gz`: every trial's trial.json,
evaluation report and metrics, and the edge stage's final checkpoint. Unpack it into the parent run's
`sweeps/` folder and `dymu sweep --sweep <file> --run_dir <parent>` writes the summary (finished trials are
skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dymu.layout import RunLayout  # noqa: E402
from stages.common import read_yaml, write_yaml  # noqa: E402
from stages.sweep import agent_arguments, load_sweep, plan_trials, trial_name  # noqa: E402

DYMU = [sys.executable, "-c", "import sys; from stages.cli import entry_point; sys.exit(entry_point())"]


def prepare_parent(parent: Path, work: Path, accelerator: str) -> Path:
    """A copy of the parent run with only what a trial reads, set to the accelerator and a CSV logger."""
    source, copy = RunLayout(parent), RunLayout(work / parent.name)
    for path in (source.final("anchor"), source.affinity, source.pipeline_config):
        target = copy.root / path.relative_to(source.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    config = read_yaml(copy.pipeline_config)
    config["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger"}
    for stage in ("edge", "weight"):
        trainer = config[stage].setdefault("trainer", {})
        trainer.update(accelerator=accelerator, devices=1, enable_progress_bar=False)
    config.setdefault("evaluate", {})["device"] = "cuda" if accelerator == "gpu" else "cpu"
    write_yaml(config, copy.pipeline_config)
    return copy.root


def launch(parent: Path, params: dict, log: Path, threads: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return subprocess.Popen(DYMU + ["trial", "--run_dir", str(parent)] + agent_arguments(params),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def train_seconds(checkpoint: Path) -> float:
    import torch

    return float(torch.load(checkpoint, map_location="cpu", weights_only=False)["dymu_train_seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", required=True, help="a run with a trained anchor and affinity")
    parser.add_argument("--sweep", action="append", required=True, help="a sweep file (repeatable)")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--edge_budget_s", type=float, default=300.0)
    parser.add_argument("--calibrate_steps", type=int, default=300)
    parser.add_argument("--max_steps", type=int, default=30000, help="the paper's edge-stage length")
    parser.add_argument("--min_steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per trial")
    parser.add_argument("--work", default="/tmp/long_edge")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/long_edge_out"))
    args = parser.parse_args()

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    parent = prepare_parent(Path(args.parent).resolve(), work, args.accelerator)
    plan = [params for path in args.sweep for params in plan_trials(load_sweep(path))]
    started = time.monotonic()

    # 1. calibration: every trial's edge stage for a few steps, all at once (as they will run)
    calibration = {"edge.trainer.max_steps": args.calibrate_steps, "weight.trainer.max_steps": 1,
                   "evaluate.num_preferences": 2, "evaluate.num_cost_preferences": 2}
    procs = [launch(parent, {**params, **calibration}, work / f"calibrate_{i}.log", args.threads)
             for i, params in enumerate(plan)]
    codes = [p.wait() for p in procs]
    if any(codes):
        print((work / "calibrate_0.log").read_text()[-4000:])
        raise SystemExit(f"calibration failed: exit codes {codes}")
    layout = RunLayout(parent)
    seconds = [train_seconds(RunLayout(layout.trial_dir(trial_name({**p, **calibration}))).final("edge"))
               for p in plan]
    per_step = max(seconds) / args.calibrate_steps
    fits = int(args.edge_budget_s / per_step // 100 * 100)
    if fits < args.min_steps:  # stop now rather than run trials that cannot finish in the budget
        raise SystemExit(f"[long_edge] {len(plan)} trials at once take {per_step * 1000:.1f} ms per step: "
                         f"{args.edge_budget_s:.0f} s fit {fits} steps, fewer than --min_steps {args.min_steps}; "
                         f"{args.max_steps} steps need {args.max_steps * per_step / 60:.0f} min. Run fewer trials "
                         "at once or give a larger --edge_budget_s")
    steps = min(args.max_steps, fits)
    print(f"[long_edge] calibration: {len(plan)} trials at once, {per_step * 1000:.1f} ms per step "
          f"(slowest); edge stage {steps} steps", flush=True)

    # 2. the trials, all at once
    trials = [{**p, "edge.trainer.max_steps": steps} for p in plan]
    procs = [launch(parent, params, work / f"trial_{i}.log", args.threads) for i, params in enumerate(trials)]
    codes = [p.wait() for p in procs]
    print(f"[long_edge] trials finished in {time.monotonic() - started:.0f} s, exit codes {codes}", flush=True)
    for i, code in enumerate(codes):
        if code:
            print((work / f"trial_{i}.log").read_text()[-3000:])

    # 3. what comes back
    summary = []
    with tarfile.open(out / "long_edge.tar.gz", "w:gz") as tar:
        for params in trials:
            trial = RunLayout(layout.trial_dir(trial_name(params)))
            result = layout.trial_result(trial_name(params))
            if result.is_file():
                summary.append(json.loads(result.read_text()))
            for path in (result, trial.report, trial.metrics, trial.final("edge"), trial.pipeline_config):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(layout.sweeps_dir)))
            seconds = train_seconds(trial.final("edge")) if trial.final("edge").is_file() else None
            print(f"[long_edge] {trial.root.name}: edge {seconds} s", flush=True)
    for result in summary:
        print(json.dumps({"name": result["name"], **result["metrics"]}), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
