"""Sweeps over the hypernet stages' settings (``tau``, the lambdas, ...) on one trained anchor.

A sweep file is a W&B sweep config (``method``, ``metric``, ``parameters``, ``command``). Its parameter
names are dotted keys of the pipeline config (``edge.model.tau``, ``seed_everything``), the same keys
``dymu run --set`` takes. Every trial trains the edge and weight stages on the parent run's anchor and
affinity (trained once, reused by every trial) and evaluates them.

- Online: ``wandb sweep configs/sweeps/tau_lambda.yaml`` then ``wandb agent <id>``; the agent runs the
  file's ``command``, ``dymu trial --run_dir D --edge.model.tau=0.2 ...`` (W&B's ``${args}``), which logs
  the trial's metrics to the agent's W&B run.
- Offline: ``dymu sweep --sweep S --run_dir D [--trials K]`` runs the same plan locally (``grid``: every
  combination in file order; ``random``/``bayes``: K seeded random draws), one folder per trial under
  ``D/sweeps/``, skips finished trials, and writes ``D/sweeps/summary.csv`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dymu.layout import RunLayout
from stages.common import read_json, read_yaml, write_yaml
from stages.results import CostGroup, EvaluationResult, Method, TrialMetrics

SWEPT_SECTIONS = ("edge", "weight", "evaluate")
"""Top-level sections a trial may change: everything else would need a new anchor."""
METHODS = ("grid", "random", "bayes")

METRIC_COLUMNS = {  # the labels of TrialMetrics' fields, in its order
    "hv_ratio_c0": "HV / anchor's, c=0 (adapted)",
    "hv_ratio_c1": "HV / anchor's, c=1 (adapted)",
    "hv_ratio_c0_noadapt": "HV / anchor's, c=0 (no adaptation)",
    "hv_ratio_c1_noadapt": "HV / anchor's, c=1 (no adaptation)",
    "uniformity_c0": "uniformity c=0 (adapted)",
    "uniformity_c1": "uniformity c=1 (adapted)",
    "uniformity_anchor": "uniformity of the anchor",
    "params_c0": "mean params / anchor's, c=0",
    "params_c1": "mean params / anchor's, c=1",
    "params_ratio": "params c=1 / c=0",
    "focused_c0": "focused, c=0",
    "focused_c1": "focused, c=1",
    "near_uniform_c0": "near-uniform, c=0",
    "near_uniform_c1": "near-uniform, c=1",
    "uniform_c0": "uniform r, c=0",
    "uniform_c1": "uniform r, c=1",
}


# --- the sweep file and its plan ---------------------------------------------------------------------------

def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file; errors name the entry and the fix."""
    sweep = read_yaml(path, "sweep file")
    method = sweep.get("method", "grid")
    if method not in METHODS:
        raise ValueError(f"{path}: method must be one of {METHODS}, got {method!r}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: 'parameters' must map dotted config keys (e.g. edge.model.tau) to "
                         "{values: [...]}, {value: x} or {min: a, max: b}")
    for key, spec in params.items():
        check_accepted(key, path)
        if not isinstance(spec, dict) or not ({"values", "value"} & set(spec) or {"min", "max"} <= set(spec)):
            raise ValueError(f"{path}: parameter {key!r} needs 'values: [...]', 'value: x' or 'min'/'max', got {spec!r}")
        if method == "grid" and "values" not in spec and "value" not in spec:
            raise ValueError(f"{path}: grid search needs 'values' (or 'value') for {key!r}, not a range")
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            raise ValueError(f"{path}: parameter {key!r}: 'values' must be a non-empty list")
    metric = sweep.get("metric", {})
    if metric and metric.get("name") not in METRIC_COLUMNS:
        raise ValueError(f"{path}: metric.name must be one of {sorted(METRIC_COLUMNS)}, got {metric.get('name')!r}")
    return sweep


def check_swept_key(key: str, source: str | Path = "sweep") -> None:
    """A trial reuses the parent's anchor: only the hypernet stages, evaluation and the seed may change."""
    top = key.split(".")[0]
    if key != "seed_everything" and (top not in SWEPT_SECTIONS or "." not in key):
        raise ValueError(f"{source}: cannot sweep {key!r}: a trial reuses the parent run's anchor, so only "
                         f"seed_everything and keys under {', '.join(SWEPT_SECTIONS)} (e.g. edge.model.tau) may "
                         "vary; sweep anchor or data settings with separate `dymu run`s")


STAGE_MODULES = {"edge": ("lightning_modules.edge", "EdgeHypernetSearch"),
                 "weight": ("lightning_modules.weight", "WeightHypernetAdaptation")}


def check_accepted(key: str, source: str | Path = "sweep") -> None:
    """Refuse a key that the command it feeds does not take (a typo), before anything trains."""
    import importlib
    import inspect

    check_swept_key(key, source)
    parts = key.split(".")
    if key == "seed_everything" or len(parts) < 3 and parts[0] != "evaluate":
        return
    if parts[0] == "evaluate":
        from stages.evaluate import evaluate_run

        target, name = evaluate_run, parts[1]
    elif parts[1] == "model":
        module, cls = STAGE_MODULES[parts[0]]
        target, name = getattr(importlib.import_module(module), cls).__init__, parts[2]
    elif parts[1] == "trainer":
        from lightning.pytorch import Trainer

        target, name = Trainer.__init__, parts[2]
    else:
        return  # data and checkpoint entries are checked by the stage's own LightningCLI
    accepted = [p for p in inspect.signature(target).parameters if p not in ("self", "run_dir")]
    if name not in accepted:
        raise ValueError(f"{source}: {key!r}: {target.__qualname__.split('.')[0]} takes no argument {name!r}; it "
                         f"takes {', '.join(accepted)}")


def _draw(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][int(rng.integers(len(spec["values"])))]
    low, high = spec["min"], spec["max"]
    dist = spec.get("distribution", "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if dist == "int_uniform":
        return int(rng.integers(low, high + 1))
    if dist == "uniform":
        return float(rng.uniform(low, high))
    if dist == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    raise ValueError(f"distribution {dist!r} is not supported locally (use uniform, int_uniform, "
                     "log_uniform_values or a values list)")


def plan_trials(sweep: dict[str, Any], trials: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials' parameter sets: every grid combination (in file order, the first parameter slowest), or
    ``trials`` seeded random draws (``random``; ``bayes`` has no local model and draws at random too)."""
    params = sweep["parameters"]
    if sweep.get("method", "grid") == "grid":
        keys = list(params)
        choices = [params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys]
        plan = [dict(zip(keys, combo)) for combo in itertools.product(*choices)]
        return plan[:trials] if trials is not None else plan
    count = trials if trials is not None else int(sweep.get("run_cap", 10))
    rng = np.random.default_rng(seed)
    return [{k: _draw(spec, rng) for k, spec in params.items()} for _ in range(count)]


def trial_name(params: dict[str, Any]) -> str:
    """A folder name that is a function of the parameters alone (so a rerun finds the finished trial)."""
    parts = []
    for key, value in params.items():
        short = key.replace(".model.", ".").replace("seed_everything", "seed")
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        parts.append(f"{short}={text}")
    name = ",".join(parts)
    return "".join(ch if ch.isalnum() or ch in "=.,-_" else "_" for ch in name)


def override_strings(params: dict[str, Any]) -> list[str]:
    """``--set``-style ``key=value`` strings (values as YAML)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in params.items()]


def agent_arguments(params: dict[str, Any]) -> list[str]:
    """What W&B's ``${args}`` gives the command for one trial: ``--key=value`` per parameter."""
    return [f"--{item}" for item in override_strings(params)]


# --- one trial ---------------------------------------------------------------------------------------------

def trial_config(parent_config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    from stages.runner import apply_overrides, check_pipeline_config

    for key in params:
        check_accepted(key, "trial")
    config = apply_overrides(parent_config, override_strings(params))
    check_pipeline_config(config, "the trial's config")
    return config


def run_trial(parent_dir: str | Path, params: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Train the edge and weight stages for ``params`` on the parent run's anchor and affinity, evaluate, and
    write ``<parent>/sweeps/<name>/trial.json`` (parameters and metrics). Resumes an interrupted trial."""
    from stages.evaluate import evaluate_run
    from stages.graph import order
    from stages.lineage import run_lock
    from stages.runner import check_before_training, run_stage

    parent = RunLayout(Path(parent_dir).resolve())
    for path in (parent.pipeline_config, parent.final("anchor"), parent.affinity):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a sweep's parent run needs a trained anchor and its affinity; "
                                    f"run `dymu sweep --sweep S --run_dir {parent.root} --config <pipeline.yaml>` to "
                                    "train them first")
    config = trial_config(read_yaml(parent.pipeline_config), params)
    name = name or trial_name(params)
    trial = RunLayout(parent.trial_dir(name))
    # the trial's own stages: what the table puts after the parent's anchor and affinity
    stages = [s for s in order() if s.name not in ("anchor", "affinity")]
    sources = {"anchor": parent, "affinity": parent}
    configs = check_before_training(config, trial.root, stages, sources)
    with run_lock(trial.root, "trial"):
        write_yaml(config, trial.pipeline_config)
        for spec in stages:
            run_stage(spec.name, configs[spec.name], trial.root)
        evaluation = evaluate_run(trial.root, **(config.get("evaluate") or {}))
    result = {"name": trial.root.name, "parameters": params, "metrics": trial_metrics(evaluation).to_json()}
    parent.trial_result(name).write_text(json.dumps(result, indent=1))
    return result


def trial_metrics(evaluation: EvaluationResult | dict[str, Any]) -> TrialMetrics:
    """The sweep's columns from ``evaluate_run``'s result, typed or its JSON (fractions are of the anchor's
    parameters); records and cost entries are found by their typed fields, not their labels."""
    result = evaluation if isinstance(evaluation, EvaluationResult) else EvaluationResult.from_json(evaluation)
    out: dict[str, float] = {}
    for c in (0.0, 1.0):
        for adapt, suffix in ((True, ""), (False, "_noadapt")):
            rec = result.record(Method.DYMU, adapt, c)  # no adapted record without a weight stage: NaN
            ratio = rec.hypervolume_ratio if rec is not None else None
            out[f"hv_ratio_c{c:g}{suffix}"] = float("nan") if ratio is None else float(ratio)
            if adapt:
                out[f"uniformity_c{c:g}"] = rec.uniformity if rec is not None else float("nan")
        anchor = result.record(Method.ANCHOR, False, c)
        out["uniformity_anchor"] = anchor.uniformity if anchor is not None else float("nan")
    anchor_params = result.anchor["params"]

    def fraction(group: CostGroup, c: float) -> float:
        found = result.cost(group, c)
        return found.mean_params / anchor_params if found is not None and found.count else float("nan")

    for c in (0.0, 1.0):
        out[f"params_c{c:g}"] = fraction(CostGroup.ALL, c)
        out[f"focused_c{c:g}"] = fraction(CostGroup.FOCUSED, c)
        out[f"near_uniform_c{c:g}"] = fraction(CostGroup.NEAR_UNIFORM, c)
    out["params_ratio"] = out["params_c1"] / out["params_c0"]
    uniform = result.uniform_controllability()
    for c in (0.0, 1.0):
        out[f"uniform_c{c:g}"] = uniform["params"][str(c)] / anchor_params if uniform else float("nan")
    return TrialMetrics(**out)


# --- the local sweep and its summary ----------------------------------------------------------------------

def ensure_parent(run_dir: Path, config_path: str | None, overrides: Sequence[str] = ()) -> None:
    """Train the parent's anchor and affinity if they are not there yet (from ``config_path``)."""
    from stages.runner import load_pipeline_config, run_pipeline

    layout = RunLayout(run_dir)
    if layout.final("anchor").is_file() and layout.affinity.is_file():
        return
    if config_path is None:
        existing = layout.pipeline_config
        if not existing.is_file():
            raise FileNotFoundError(f"{run_dir} holds no trained anchor; pass --config <pipeline.yaml> to train it")
        config_path = str(existing)
    load_pipeline_config(config_path, list(overrides))  # fail on a bad config before training
    run_pipeline(config_path, run_dir, overrides=list(overrides), stages=("affinity",))


def run_sweep(sweep_path: str | Path, run_dir: str | Path, trials: int | None = None, seed: int = 0,
              config_path: str | None = None, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run (or resume) the local plan of a sweep file; write ``summary.csv`` and ``summary.md``."""
    sweep = load_sweep(sweep_path)
    run_dir = Path(run_dir).resolve()
    plan = plan_trials(sweep, trials, seed)
    layout = RunLayout(run_dir)
    parent = read_yaml(layout.pipeline_config) if layout.pipeline_config.is_file() else None
    if parent is None and config_path is not None:
        from stages.runner import load_pipeline_config

        parent = load_pipeline_config(config_path, list(overrides))
    for params in plan:  # check every trial's config before any training
        if parent is not None:
            trial_config(parent, params)
    ensure_parent(run_dir, config_path, overrides)
    results = []
    for i, params in enumerate(plan):
        done = layout.trial_result(trial_name(params))
        if done.is_file():
            print(f"[dymu sweep] trial {i + 1}/{len(plan)} {trial_name(params)}: finished, skipping")
            results.append(read_json(done, "delete it and rerun the sweep: it runs that trial again"))
            continue
        print(f"[dymu sweep] trial {i + 1}/{len(plan)} {trial_name(params)}")
        results.append(run_trial(run_dir, params))
        write_summary(layout, results, sweep, Path(sweep_path).stem)
    write_summary(layout, results, sweep, Path(sweep_path).stem)
    return results


def write_summary(layout: RunLayout, results: Sequence[dict[str, Any]], sweep: dict[str, Any], name: str = "") -> None:
    """``summary.csv`` (one row per trial) and ``summary.md`` (the same, plus mean and spread over seeds) of the
    latest sweep, and a copy of both named after the sweep file (``summary_<name>.*``) that later sweeps in the
    same run directory leave alone."""
    layout.sweeps_dir.mkdir(parents=True, exist_ok=True)
    keys = list(sweep["parameters"])
    with open(layout.sweep_summary("csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", *keys, *METRIC_COLUMNS])
        for res in results:
            metrics = TrialMetrics.from_json(res["metrics"])
            writer.writerow([res["name"], *(res["parameters"].get(k) for k in keys),
                             *(f"{metrics.value(m):.4f}" for m in METRIC_COLUMNS)])
    metric = sweep.get("metric", {})
    lines = ["# Sweep summary", "",
             f"{len(results)} trials. Fractions are of the anchor's parameters (1000 preferences per c); HV ratios "
             "are against the single-task anchor's hypervolume at the same c (20 preferences).", ""]
    if metric:
        lines += [f"Objective: {metric.get('name')} ({metric.get('goal', 'maximize')}).", ""]
    shown = list(METRIC_COLUMNS)
    lines += ["| trial | " + " | ".join(METRIC_COLUMNS[m] for m in shown) + " |",
              "| --- | " + " | ".join("---" for _ in shown) + " |"]
    for res in results:
        metrics = TrialMetrics.from_json(res["metrics"])
        lines.append(f"| {res['name']} | " + " | ".join(f"{metrics.value(m):.3f}" for m in shown) + " |")
    if "seed_everything" in keys and len(keys) > 1:
        groups: dict[str, list[dict[str, Any]]] = {}
        for res in results:
            setting = {k: v for k, v in res["parameters"].items() if k != "seed_everything"}
            groups.setdefault(trial_name(setting), []).append(res)
        lines += ["", "## Mean and spread over seeds (mean ± standard deviation; n = seeds)", "",
                  "| setting | n | " + " | ".join(METRIC_COLUMNS[m] for m in shown) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in shown) + " |"]
        for setting, members in groups.items():
            cells = []
            for m in shown:
                values = np.array([TrialMetrics.from_json(r["metrics"]).value(m) for r in members], dtype=float)
                cells.append(f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}")
            lines.append(f"| {setting} | {len(members)} | " + " | ".join(cells) + " |")
    layout.sweep_summary("md").write_text("\n".join(lines) + "\n")
    if name:
        for suffix in ("csv", "md"):
            layout.sweep_summary(suffix, name).write_text(layout.sweep_summary(suffix).read_text())


# --- command lines -----------------------------------------------------------------------------------------

def parse_trial_arguments(items: Sequence[str]) -> dict[str, Any]:
    """``--key=value`` or ``key=value`` (W&B's ``${args}`` / ``${args_no_hyphens}``) -> parameters."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ValueError(f"trial argument {item!r} must look like --dotted.key=value")
        check_accepted(key, "dymu trial")
        params[key] = parse_value(raw)
    return params


def parse_value(raw: str) -> Any:
    """A value as W&B writes it into ``${args}`` (Python's ``str``: ``1e-05``, ``None``, ``True``) or as YAML."""
    if raw in ("None", "null", "~"):
        return None
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(raw)
        except ValueError:
            return value
    return value


def trial_main(argv: list[str] | None = None) -> int:
    """``dymu trial --run_dir D --edge.model.tau=0.2 ...``: one trial (the command a W&B agent runs)."""
    parser = argparse.ArgumentParser(prog="dymu trial", description=run_trial.__doc__)
    parser.add_argument("--run_dir", required=True, help="the parent run (trained anchor and affinity)")
    args, rest = parser.parse_known_args(argv)
    try:
        params = parse_trial_arguments(rest)
        result = run_trial(args.run_dir, params)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"dymu trial: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, as every command
        return 1
    if os.environ.get("WANDB_SWEEP_ID"):
        import wandb

        run = wandb.init(config=params, name=result["name"])
        run.log(result["metrics"])
        run.finish()
    print(json.dumps(result["metrics"], indent=1))
    return 0


def sweep_main(argv: list[str] | None = None) -> int:
    """``dymu sweep --sweep S --run_dir D [--trials K] [--seed 0] [--config P]``."""
    parser = argparse.ArgumentParser(prog="dymu sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="a W&B sweep file (e.g. configs/sweeps/tau_lambda.yaml)")
    parser.add_argument("--run_dir", required=True, help="the parent run: its anchor and affinity are reused")
    parser.add_argument("--trials", type=int, default=None, help="grid: the first K trials; random: K draws "
                        "(default: run_cap, else 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random plan")
    parser.add_argument("--config", default=None, help="pipeline config to train the parent's anchor from, if "
                        "the run directory has none yet")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override an entry of --config for the parent run")
    args = parser.parse_args(argv)
    from stages.lineage import run_lock

    try:
        with run_lock(args.run_dir, "sweep"):
            results = run_sweep(args.sweep, args.run_dir, args.trials, args.seed, args.config, args.overrides)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"dymu sweep: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, as every command
        return 1
    print(f"[dymu sweep] {len(results)} trials; summary: {RunLayout(args.run_dir).sweep_summary('md')}")
    return 0
