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
  ``--batch_trials K`` trains up to K trials at once in one process (``stages.batched_sweep``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import itertools
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from jsonargparse.typing import PositiveInt

from dymu.layout import TRIAL_RESULT, RunLayout
from stages.common import load_yaml_file, read_json
from stages.results import CostGroup, EvaluationResult, Method, TrialMetrics

if TYPE_CHECKING:
    from stages.batched_sweep import PendingTrial
    from stages.pipeline import PipelineConfig

SWEPT_SECTIONS = ("edge", "weight", "evaluate")
"""Top-level sections a trial may change: everything else would need a new anchor."""
TRIAL_SCHEMA_VERSION = 1
"""The version of ``trial.json``'s layout (``name``, ``parameters``, ``metrics``: ``TrialMetrics``)."""

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

@dataclass(frozen=True)
class SweepParameter:
    """One parameter of a sweep file: a list of ``values`` (a fixed ``value: x`` is read as ``values: [x]``), or a
    range ``min``..``max`` drawn with ``distribution`` (default: ``int_uniform`` between two ints, else
    ``uniform``)."""

    values: list[Any] | None = None
    min: int | float | None = None
    max: int | float | None = None
    distribution: Literal["uniform", "int_uniform", "log_uniform_values"] | None = None

    def choices(self) -> list[Any] | None:
        """The values a grid takes (None for a range)."""
        return None if self.values is None else list(self.values)


@dataclass(frozen=True)
class SweepMetric:
    name: Literal[tuple(METRIC_COLUMNS)]  # type: ignore[valid-type]
    goal: Literal["maximize", "minimize"] = "maximize"


@dataclass(frozen=True)
class SweepFile:
    """A W&B sweep file as the local sweep reads it (W&B's other keys are accepted and left to W&B).

    Attributes:
        parameters: dotted keys of the pipeline config (as ``dymu run --set`` takes them) -> their values.
        method: ``grid`` (every combination) or ``random`` / ``bayes`` (seeded random draws locally).
        metric: the objective, one of the sweep summary's columns.
        run_cap: the number of random draws when ``--trials`` is not given (default 10).
    """

    parameters: dict[str, SweepParameter]
    method: Literal["grid", "random", "bayes"] = "grid"
    metric: SweepMetric | None = None
    run_cap: PositiveInt | None = None
    name: str | None = None
    description: str | None = None
    program: str | None = None
    command: list[str] | None = None
    project: str | None = None
    entity: str | None = None
    early_terminate: dict[str, Any] | None = None


def load_sweep(path: str | Path) -> SweepFile:
    """Read and check a sweep file with its parser (one line naming the key and the fix otherwise)."""
    from jsonargparse import ArgumentParser

    from stages.pipeline import error_line

    data = load_yaml_file(path, "sweep file")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level")
    params = data.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ValueError(f"{path}: 'parameters' must map dotted config keys (e.g. edge.model.tau) to "
                         "{values: [...]}, {value: x} or {min: a, max: b}")
    fixed = {key: {"values": [spec["value"]], **{k: v for k, v in spec.items() if k != "value"}}
             if isinstance(spec, dict) and "value" in spec else spec for key, spec in params.items()}
    for key, spec in fixed.items():  # each parameter on its own first, so that an error names it
        single = ArgumentParser(exit_on_error=False)
        single.add_class_arguments(SweepParameter, "spec")
        try:
            single.parse_object({"spec": copy.deepcopy(spec)})
        except Exception as err:  # noqa: BLE001 - as below
            raise ValueError(f"{path}: parameter {key!r}: {error_line(str(err)).replace('spec.', '')}") from None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SweepFile, "sweep")
    given = copy.deepcopy({"sweep": {**data, "parameters": fixed}})  # the parser changes what it is given
    try:
        sweep = parser.instantiate_classes(parser.parse_object(given)).sweep
    except Exception as err:  # noqa: BLE001 - jsonargparse raises several types; one line with the key
        raise ValueError(f"{path}: {error_line(str(err)).replace('sweep.', '')}") from None
    for key, spec in list(sweep.parameters.items()):
        raw = fixed[key] if isinstance(fixed[key], dict) else {}
        bounds = {k: raw[k] for k in ("min", "max") if isinstance(raw.get(k), (int, float))
                  and not isinstance(raw.get(k), bool)}
        if bounds:  # as written: the parser may read `int | float` as a float once other types are registered, and
            spec = sweep.parameters[key] = dataclasses.replace(spec, **bounds)  # int bounds draw ints
        check_swept_key(key, path)
        given = {k for k in ("values", "min", "max") if getattr(spec, k) is not None}
        if not given or given == {"min"} or given == {"max"}:
            raise ValueError(f"{path}: parameter {key!r} needs 'values: [...]', 'value: x' or 'min'/'max', got "
                             f"{params[key]!r}")
        if sweep.method == "grid" and spec.choices() is None:
            raise ValueError(f"{path}: grid search needs 'values' (or 'value') for {key!r}, not a range")
        if spec.values is not None and not spec.values:
            raise ValueError(f"{path}: parameter {key!r}: 'values' must be a non-empty list")
    return sweep


def check_swept_key(key: str, source: str | Path = "sweep") -> None:
    """A trial reuses the parent's anchor: only the hypernet stages, evaluation and the seed may change."""
    top = key.split(".")[0]
    if key != "seed_everything" and (top not in SWEPT_SECTIONS or "." not in key):
        raise ValueError(f"{source}: cannot sweep {key!r}: a trial reuses the parent run's anchor, so only "
                         f"seed_everything and keys under {', '.join(SWEPT_SECTIONS)} (e.g. edge.model.tau) may "
                         "vary; sweep anchor or data settings with separate `dymu run`s")


def _draw(spec: SweepParameter, rng: np.random.Generator) -> Any:
    choices = spec.choices()
    if choices is not None:
        return choices[int(rng.integers(len(choices)))]
    low, high = spec.min, spec.max
    dist = spec.distribution or ("int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if dist == "int_uniform":
        return int(rng.integers(low, high + 1))
    if dist == "uniform":
        return float(rng.uniform(low, high))
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def plan_trials(sweep: SweepFile, trials: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials' parameter sets: every grid combination (in file order, the first parameter slowest), or
    ``trials`` seeded random draws (``random``; ``bayes`` has no local model and draws at random too)."""
    params = sweep.parameters
    if sweep.method == "grid":
        keys = list(params)
        plan = [dict(zip(keys, combo)) for combo in itertools.product(*(params[k].choices() for k in keys))]
        return plan[:trials] if trials is not None else plan
    count = trials if trials is not None else (sweep.run_cap or 10)
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

def trial_config(parent: PipelineConfig, params: dict[str, Any], seeded: bool = False) -> PipelineConfig:
    """The parent run's config with a trial's parameters, each checked by the pipeline parser; ``seeded``: with
    ``seeded_sampling: true`` in the edge and weight stages first (every trial of ``dymu sweep --batch_trials``)."""
    from stages.batched_sweep import SEEDED

    for key in params:
        check_swept_key(key, "trial")
    return parent.with_overrides([*(SEEDED if seeded else ()), *override_strings(params)],
                                 source="the trial's config")


def check_trial(parent_dir: Path, config: PipelineConfig, name: str) -> dict[str, dict[str, Any]]:
    """A trial's stage configs, parsed and type-checked by the stages' LightningCLIs before anything trains
    (``check_before_training``); the trial's own stages are those the table puts after the anchor and
    affinity, which it reads from the parent run."""
    from stages.graph import order
    from stages.runner import check_before_training

    parent, trial = RunLayout(parent_dir), RunLayout(RunLayout(parent_dir).trial_dir(name))
    stages = [s for s in order() if s.name not in ("anchor", "affinity")]
    return check_before_training(config, trial.root, stages, {"anchor": parent, "affinity": parent})


def run_trial(parent_dir: str | Path, params: dict[str, Any], name: str | None = None,
              parent_config: PipelineConfig | None = None, seeded: bool = False) -> dict[str, Any]:
    """Train the edge and weight stages for ``params`` on the parent run's anchor and affinity, evaluate, and
    write ``<parent>/sweeps/<name>/trial.json`` (parameters and metrics). Resumes an interrupted trial.

    Args:
        parent_config: the parent run's config (default: read from its ``pipeline.yaml``).
        seeded: run the stages with ``seeded_sampling: true`` (as ``dymu sweep --batch_trials`` runs every trial).
    """
    from stages.lineage import run_lock
    from stages.runner import run_stage

    trial = prepare_trial(parent_dir, params, name, parent_config, seeded)
    with run_lock(trial.layout.root, "trial"):
        trial.config.write(trial.layout.pipeline_config)
        for folder, stage_config in trial.configs.items():
            run_stage(folder.split("/")[0], stage_config, trial.layout.root, folder)
        return finish_trial(trial)


def prepare_trial(parent_dir: str | Path, params: dict[str, Any], name: str | None = None,
                  parent_config: PipelineConfig | None = None, seeded: bool = False, index: int = 0
                  ) -> PendingTrial:
    """A trial's config and checked stage configs (nothing written yet)."""
    from stages.batched_sweep import PendingTrial
    from stages.pipeline import run_config

    parent = RunLayout(Path(parent_dir).resolve())
    for path in (parent.pipeline_config, parent.final("anchor"), parent.affinity):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a sweep's parent run needs a trained anchor and its affinity; "
                                    f"run `dymu sweep --sweep S --run_dir {parent.root} --config <pipeline.yaml>` to "
                                    "train them first")
    config = trial_config(parent_config or run_config(parent.root), params, seeded)
    name = name or trial_name(params)
    configs = check_trial(parent.root, config, name)
    return PendingTrial(index, name, params, config, configs, RunLayout(parent.trial_dir(name)))


def finish_trial(trial: PendingTrial) -> dict[str, Any]:
    """Evaluate a trained trial (``evaluate_run``) and write its ``trial.json``."""
    from stages.evaluate import evaluate_run

    evaluation = evaluate_run(trial.layout.root, **trial.config.evaluate_given(), data=trial.config.data)
    result = {"schema_version": TRIAL_SCHEMA_VERSION, "name": trial.layout.root.name, "parameters": trial.params,
              "metrics": trial_metrics(evaluation).to_json()}
    trial.layout.root.joinpath(TRIAL_RESULT).write_text(json.dumps(result, indent=1))
    return result


def read_trial(path: Path) -> dict[str, Any]:
    """A finished trial's ``trial.json``; one written by a newer dymu, or cut short, is a one-line error."""
    fix = "delete it and rerun the sweep: it runs that trial again"
    result = read_json(path, fix)
    version = result.get("schema_version", TRIAL_SCHEMA_VERSION) if isinstance(result, dict) else None
    if not isinstance(version, int) or version > TRIAL_SCHEMA_VERSION or not {"name", "parameters", "metrics"} <= set(
            result):
        raise ValueError(f"{path} is not a trial record this dymu reads (schema_version {version!r}, this dymu writes "
                         f"{TRIAL_SCHEMA_VERSION}); {fix}")
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

def ensure_parent(run_dir: Path, parent: PipelineConfig) -> None:
    """Train the parent's anchor and affinity if they are not there yet."""
    from stages.runner import run_pipeline

    layout = RunLayout(run_dir)
    if not (layout.final("anchor").is_file() and layout.affinity.is_file()):
        run_pipeline(parent, run_dir, stages=("affinity",))


def representative_trials(plan: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that together hold every value of every parameter of ``plan`` (its first trial for each): checking
    these checks every key and value the sweep will use."""
    chosen: list[dict[str, Any]] = list(plan[:1])
    seen = {(key, json.dumps(value, default=str)) for params in chosen for key, value in params.items()}
    for params in plan:
        new = {(key, json.dumps(value, default=str)) for key, value in params.items()} - seen
        if new:
            chosen.append(params)
            seen |= new
    return chosen


def run_sweep(sweep_path: str | Path, run_dir: str | Path, trials: int | None = None, seed: int = 0,
              config_path: str | None = None, overrides: Sequence[str] = (), batch_trials: int | None = None
              ) -> list[dict[str, Any]]:
    """Run (or resume) the local plan of a sweep file; write ``summary.csv`` and ``summary.md``. The parent run's
    config is its ``pipeline.yaml`` or, for a run directory without a trained anchor, ``config_path``.
    ``batch_trials``: train up to that many trials at once in this process (``stages.batched_sweep``; every
    trial then runs with ``seeded_sampling: true``, those that cannot be batched one by one after a note)."""
    from stages.pipeline import load_pipeline_config, run_config

    if batch_trials is not None and batch_trials < 1:
        raise ValueError(f"--batch_trials must be at least 1, got {batch_trials}")
    seeded = batch_trials is not None
    sweep = load_sweep(sweep_path)
    run_dir = Path(run_dir).resolve()
    plan = plan_trials(sweep, trials, seed)
    layout = RunLayout(run_dir)
    if layout.pipeline_config.is_file():
        parent = run_config(run_dir, overrides)
    elif config_path is not None:
        parent = load_pipeline_config(config_path, overrides)
    else:
        raise FileNotFoundError(f"{run_dir} holds no trained anchor; pass --config <pipeline.yaml> to train it")
    for params in representative_trials(plan):  # every key and value checked before any training
        check_trial(run_dir, trial_config(parent, params, seeded), trial_name(params))
    ensure_parent(run_dir, parent)
    results: list[dict[str, Any] | None] = [None] * len(plan)
    pending = []
    for i, params in enumerate(plan):
        done = layout.trial_result(trial_name(params))
        if done.is_file():
            print(f"[dymu sweep] trial {i + 1}/{len(plan)} {trial_name(params)}: finished, skipping")
            results[i] = read_trial(done)
        else:
            pending.append((i, params))

    def finished(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        write_summary(layout, [r for r in results if r is not None], sweep, Path(sweep_path).stem)

    if not seeded:
        for i, params in pending:
            print(f"[dymu sweep] trial {i + 1}/{len(plan)} {trial_name(params)}")
            finished(i, run_trial(run_dir, params, parent_config=parent))
    else:
        from stages.batched_sweep import plan_groups, run_group

        prepared = [prepare_trial(run_dir, params, None, parent, True, i) for i, params in pending]
        groups, alone = plan_groups(prepared, batch_trials)  # type: ignore[arg-type]
        for trial, reason in alone:
            print(f"[dymu sweep] trial {trial.index + 1}/{len(plan)} {trial.name}: runs alone ({reason})")
            finished(trial.index, run_trial(run_dir, trial.params, parent_config=parent, seeded=True))
        for group in groups:
            print(f"[dymu sweep] trials {', '.join(str(t.index + 1) for t in group)}/{len(plan)}: "
                  f"{len(group)} batched in one process")
            for trial, result in zip(group, run_group(layout, group, finish_trial)):
                finished(trial.index, result)
    write_summary(layout, [r for r in results if r is not None], sweep, Path(sweep_path).stem)
    return [r for r in results if r is not None]


def write_summary(layout: RunLayout, results: Sequence[dict[str, Any]], sweep: SweepFile, name: str = "") -> None:
    """``summary.csv`` (one row per trial) and ``summary.md`` (the same, plus mean and spread over seeds) of the
    latest sweep, and a copy of both named after the sweep file (``summary_<name>.*``) that later sweeps in the
    same run directory leave alone."""
    layout.sweeps_dir.mkdir(parents=True, exist_ok=True)
    keys = list(sweep.parameters)
    with open(layout.sweep_summary("csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", *keys, *METRIC_COLUMNS])
        for res in results:
            metrics = TrialMetrics.from_json(res["metrics"])
            writer.writerow([res["name"], *(res["parameters"].get(k) for k in keys),
                             *(f"{metrics.value(m):.4f}" for m in METRIC_COLUMNS)])
    metric = sweep.metric
    lines = ["# Sweep summary", "",
             f"{len(results)} trials. Fractions are of the anchor's parameters (1000 preferences per c); HV ratios "
             "are against the single-task anchor's hypervolume at the same c (20 preferences).", ""]
    if metric:
        lines += [f"Objective: {metric.name} ({metric.goal}).", ""]
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
        check_swept_key(key, "dymu trial")
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
    parser.add_argument("--batch_trials", type=int, default=None, metavar="K",
                        help="train up to K trials at once in this process (stacked hypernets on one anchor; "
                        "every trial with seeded_sampling: true; trials that cannot be batched, e.g. search: "
                        "measured, run one by one after a note). Use the same flag on every rerun of a sweep")
    args = parser.parse_args(argv)
    from stages.lineage import run_lock

    try:
        with run_lock(args.run_dir, "sweep"):
            results = run_sweep(args.sweep, args.run_dir, args.trials, args.seed, args.config, args.overrides,
                                args.batch_trials)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"dymu sweep: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, as every command
        return 1
    print(f"[dymu sweep] {len(results)} trials; summary: {RunLayout(args.run_dir).sweep_summary('md')}")
    return 0
