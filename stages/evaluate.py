"""``dymu evaluate --run_dir D``: the evaluation protocol (docs/method.md, "Evaluation protocol") on a finished run.

Writes ``<run_dir>/evaluation/metrics.json`` (``stages.results.EvaluationResult``: one record per method,
adaptation and c, with the per-preference loss vectors and trees; the inference cost per group of preferences
and c; its ``schema_version``), ``report.md`` and its figures (``stages.plots``): resource usage over
the task simplex and marginal controllability. The test set is streamed once through every evaluated
configuration in a Lightning test loop (``lightning_modules.evaluation``), on the CPU or GPUs, DDP-aware.
"""

from __future__ import annotations

import argparse
import json
import typing
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dymu.layout import RunLayout
from stages.common import build_data, read_yaml
from stages.lineage import run_lock, scored_record
from stages.pipeline import evaluation_options
from stages.results import (
    CompareKind,
    CompareRow,
    ComparisonResult,
    CostGroup,
    CostSummary,
    EvaluationRecord,
    EvaluationResult,
    Method,
    cost_label,
    method_label,
    with_ratios,
)

if typing.TYPE_CHECKING:  # torch, Lightning and the model are imported where used: `dymu evaluate --help` is fast
    import torch

    from dymu.tasks import Task
    from lightning_modules.evaluation import StreamedLosses


def training_images(data_config: dict[str, Any], num_batches: int, seed: int = 0) -> list[torch.Tensor]:
    """The images of the first ``num_batches`` training batches (for BatchNorm recalibration), shuffled by
    ``seed``: the same images on every call and every DDP process."""
    import torch

    data = build_data(data_config)
    data.setup("fit")
    images: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in data.train_dataloader():
            images.append(batch["image"])
            if len(images) >= num_batches:
                break
    return images


def run_data_config(run_dir: str | Path) -> dict[str, Any]:
    """The data config of a run that was trained stage by stage (``dymu <stage> fit``): its pipeline config's if it
    has one, else the anchor stage's. Commands that start from a pipeline config pass its ``data`` instead."""
    layout = RunLayout(run_dir)
    for path in (layout.pipeline_config, layout.stage_config("anchor")):
        if path.is_file():
            return read_yaml(path)["data"]
    raise FileNotFoundError(f"{run_dir} holds neither {layout.pipeline_config} nor {layout.stage_config('anchor')}: "
                            "pass a run directory written by `dymu run`")


NOT_SCORED = ("device", "devices")
"""Options of ``evaluate_run`` that change where it runs, not what it scores."""
EVALUATE_SKIP = ("run_dir", "data")
"""Arguments of ``evaluate_run`` that are not options of the pipeline config's ``evaluate`` section."""


def check_run(run_dir: str | Path) -> Path:
    """The checkpoint of the run's controllable model; a one-line error when ``run_dir`` is not a finished run."""
    layout = RunLayout(run_dir)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist: pass the folder that `dymu run` wrote")
    if not layout.is_run():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {layout.pipeline_config} or stage config "
                                "in it): pass the folder that `dymu run` wrote")
    return layout.model_checkpoint()


def with_hypervolume_ratios(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The JSON form of ``stages.results.with_ratios``: copies of the records (``EvaluationRecord.to_json``
    dicts) with ``hypervolume_ratio``, the hypervolume over the single-task anchor's at the same ``c`` (the
    anchor's own record gets 1), placed after ``hypervolume_method``.

    The ratio is None where no anchor record has that ``c`` or the anchor's hypervolume is 0.
    """
    return [rec.to_json() for rec in with_ratios([EvaluationRecord.from_json(r) for r in records])]


def trainer_device(device: str, devices: int) -> dict[str, Any]:
    """The Trainer's ``accelerator``, ``devices`` and ``strategy`` for ``--device`` and ``--devices``; a device
    this machine lacks is a one-line error naming the fix."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:<index>") from err
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the evaluation runs on cpu or cuda")
    if dev.index is not None and devices > 1:
        raise ValueError(f"device {device!r} names one GPU but devices={devices}: pass --device cuda")
    if dev.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ValueError(f"device {device!r}: this machine has no CUDA GPU (torch sees none); evaluate on the CPU "
                             "with --device cpu")
        if dev.index is not None and dev.index >= available:
            raise ValueError(f"device {device!r}: this machine has {available} CUDA GPU(s), cuda:0 to "
                             f"cuda:{available - 1}; pick one of them or --device cpu")
        if devices > available:
            raise ValueError(f"devices={devices} but this machine has {available} CUDA GPU(s); pass --devices "
                             f"{available} or fewer")
    return {"accelerator": "gpu" if dev.type == "cuda" else "cpu",
            "devices": [dev.index] if dev.index is not None else devices,
            "strategy": "ddp" if devices > 1 else "auto"}


def stream_test_losses(module_factory: Callable[[Sequence[Task]], StreamedLosses], data_config: dict[str, Any],
                       max_batches: int | None, device: str, devices: int, root: Path
                       ) -> tuple[dict[Hashable, list[float]], int, bool]:
    """Run a test loop (``module_factory(tasks)``, e.g. ``ProtocolEvaluation``) over the run's test split: the
    scaled test losses per configuration key, the number of test samples, and whether this is the main
    process (under DDP)."""
    from lightning.pytorch import Trainer

    from dymu.evaluation import scaled

    data = build_data(data_config)
    tasks = data.tasks
    module = module_factory(tasks)
    trainer = Trainer(**trainer_device(device, devices), logger=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=root,
                      limit_test_batches=max_batches)
    trainer.test(module, datamodule=data, verbose=False)
    if module.losses is None:
        raise ValueError("the test loop saw no batch: the run's test split is empty")
    return ({key: scaled(value, tasks) for key, value in module.losses.items()}, module.num_samples,
            trainer.is_global_zero)


def controller_record(layout: RunLayout) -> dict[str, Any] | None:
    """The measured controller's calibration, recorded in the edge stage's checkpoint (None without one)."""
    from dymu.checkpoint import META_KEY, load_checkpoint

    path = layout.final("edge")
    return load_checkpoint(path)[META_KEY].get("calibration") if path.is_file() else None


def compare_rows(layout: RunLayout) -> list[CompareRow]:
    """The baselines of ``dymu compare`` (their hypervolume ratio and parameters) when the run has them."""
    if not layout.compare_metrics.is_file():
        return []
    rows = ComparisonResult.read(layout.compare_metrics, "delete it (or rerun `dymu compare`) and evaluate again").rows
    return [r for r in rows if r.kind is not CompareKind.OURS and r.hv_ratio is not None]


def evaluate_run(run_dir: str | Path, num_preferences: int = 20, num_cost_preferences: int = 1000,
                 seed: int = 0, reference_point: Sequence[float] | None = None,
                 max_batches: int | None = None, device: str = "cpu", recalibrate_batches: int = 0,
                 devices: int = 1, budgets: Sequence[float] = (), budget_metric: Literal["params", "flops"] = "params",
                 data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a run directory and write ``evaluation/metrics.json``, ``evaluation/report.md`` and the
    report's figures (``evaluation/resource_usage.png``, ``evaluation/marginal_controllability.png``).

    The test set is streamed once (a Lightning test loop) through every evaluated configuration; memory does
    not grow with its size.

    Args:
        run_dir: a run directory with a finished edge or weight stage and its data config.
        num_preferences: preferences ``r ~ Dirichlet(1)`` per ``c`` in {0, 1} for hypervolume/uniformity.
        num_cost_preferences: preferences ``(r, c)`` over which the inference cost is averaged.
        seed: seed of both preference sets and of the recalibration batches.
        reference_point: hypervolume reference (scaled losses); default: twice the single-task anchor's
            scaled test losses (stated in the report).
        max_batches: evaluate on at most this many test batches (per process; default: the whole split).
        device: ``cpu``, ``cuda`` or ``cuda:<index>`` (the Trainer's accelerator).
        recalibrate_batches: if > 0, add the method "dymu, recalibrated BN": each tree without adaptation,
            its BatchNorm statistics re-estimated on this many training batches.
        devices: processes (DDP when > 1); each tests its own shard and the sums are added.
        budgets: fractions of the anchor's ``budget_metric`` (``params`` or ``flops``): for each, the evaluation
            preferences' trees at ``c = 0`` within that budget, scored like the others (records with ``budget``),
            and ``cost_accuracy.png``: hypervolume against cost.
        data: the run's data config (its ``PipelineConfig.data``); by default read from the run directory.

    Returns:
        The result written to ``metrics.json``, ``stages.results.EvaluationResult.to_json()`` (on the main
        process; other DDP processes get ``{}`` and write nothing).
    """
    options = {k: v for k, v in locals().items() if k not in EVALUATE_SKIP}
    from dymu.evaluation import (
        ADAPTED,
        ANCHOR,
        TREE,
        Evaluated,
        controllability_grid,
        cost_summary,
        front_summary,
        preference_records,
        protocol_variants,
    )
    from dymu.model import DynamicMultiTaskModel
    from dymu.preference import Preference, cost_preferences, evaluation_preferences
    from dymu.search_space import Architecture
    from lightning_modules.evaluation import ProtocolEvaluation
    from stages.plots import write_plots

    trainer_device(device, devices)  # a device this machine lacks fails before anything loads
    checkpoint = check_run(run_dir)
    layout = RunLayout(run_dir)
    scored = scored_record(checkpoint, layout.root.resolve(), evaluation_options(options))
    data_config = data if data is not None else run_data_config(run_dir)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 (or omitted for the whole test split), got {max_batches}")
    baselines = compare_rows(layout)  # a malformed or newer compare/metrics.json fails before the test loop
    model = DynamicMultiTaskModel.from_checkpoint(checkpoint)
    n = model.n_tasks
    if reference_point is not None and len(reference_point) != n:
        raise ValueError(f"reference_point has {len(reference_point)} entries, the model has {n} tasks")

    budgets = [float(b) for b in budgets]
    variants = protocol_variants(model, recalibrate=recalibrate_batches > 0)
    evaluated = {(c, variant, None): [Evaluated.create(model, variant, p)
                                      for p in evaluation_preferences(n, num_preferences, c=c, seed=seed)]
                 for c in (0.0, 1.0) for variant in variants}
    for budget in budgets:  # checked (a clear error) before any test batch runs
        for variant in (v for v in variants if v in (TREE, ADAPTED)):
            evaluated[(0.0, variant, budget)] = [
                Evaluated.create(model, variant, p, budget, budget_metric)
                for p in evaluation_preferences(n, num_preferences, c=0.0, seed=seed)]
    calibration = training_images(data_config, recalibrate_batches, seed) if recalibrate_batches > 0 else None
    items = [item for group in evaluated.values() for item in group]
    losses, num_samples, main_process = stream_test_losses(
        lambda tasks: ProtocolEvaluation(model, tasks, items, calibration), data_config, max_batches, device,
        devices, layout.evaluation_dir)
    if not main_process:
        return {}

    anchor_arch = Architecture.anchor(n, model.anchor.n_layers)
    anchor_losses = list(losses[evaluated[(0.0, ANCHOR, None)][0].key])
    ref_source = "configured"
    if reference_point is None:
        reference_point, ref_source = [2.0 * v for v in anchor_losses], "2 x single-task anchor losses"
    records: list[EvaluationRecord] = []
    budget_records: list[EvaluationRecord] = []
    for (c, variant, budget), items in evaluated.items():
        recs = preference_records(model, items, losses)
        record = EvaluationRecord.from_summary(Method.of(variant), variant.adaptation, c,
                                               front_summary(recs, reference_point), recs)
        if budget is None:
            records.append(record)
        else:
            anchor = model.node_costs().cost(anchor_arch)[budget_metric]
            fractions = [r[budget_metric] / anchor for r in recs]
            budget_records.append(replace(record, budget=budget, budget_metric=budget_metric,
                                          max_fraction=max(fractions), mean_fraction=float(np.mean(fractions)),
                                          within_budget=all(f <= budget + 1e-9 for f in fractions)))
    anchor_records = [r for r in records if r.method is Method.ANCHOR]
    budget_records = with_ratios(anchor_records + budget_records)[len(anchor_records):]

    anchor_cost = model.node_costs().cost(anchor_arch)
    cost_prefs = cost_preferences(n, num_cost_preferences, seed=seed)
    max_r = np.array([max(p.r) for p in cost_prefs])
    costs = [CostSummary.of(CostGroup.ALL, None, cost_summary(model, cost_prefs))]
    for group in CostGroup:
        members = [p for p, m in zip(cost_prefs, max_r) if group.holds(m, n)]
        for c in (0.0, 1.0):
            costs.append(CostSummary.of(group, c, cost_summary(model, [Preference(p.r, c) for p in members])
                                        if members else None))
    # the grid's rows: the uniform preference, then each task focused on (dymu.evaluation.controllability_grid)
    controllability = [{**row, "focus": focus} for row, focus in zip(controllability_grid(model), [None, *model.tasks])]
    result = EvaluationResult(
        tasks=tuple(model.tasks),
        reference_point=tuple(reference_point),
        reference_point_source=ref_source,
        num_test_samples=num_samples,
        anchor={"params": anchor_cost["params"], "gflops": anchor_cost["flops"] / 1e9, "losses": anchor_losses},
        control_params=model.control_parameters(),
        inference_cost=tuple(costs),
        controllability=tuple(controllability),
        records=tuple(with_ratios(records)),
        budget_records=tuple(budget_records),
        controller=controller_record(layout),
        scored=scored,
    )
    layout.evaluation_dir.mkdir(parents=True, exist_ok=True)
    result = replace(result, plots=write_plots(model, result, layout.evaluation_dir, baselines))
    layout.metrics.write_text(json.dumps(result.to_json(), indent=1))
    layout.report.write_text(render_report(result))
    print(render_report(result))
    return result.to_json()


def render_report(result: EvaluationResult | dict[str, Any]) -> str:
    """The human-readable report of ``evaluate_run``'s result (typed, or its JSON)."""
    if not isinstance(result, EvaluationResult):
        result = EvaluationResult.from_json(result)
    anchor = result.anchor
    lines = [
        "# dymu evaluation", "",
        f"Tasks: {', '.join(result.tasks)}. Test samples: {result.num_test_samples}. Loss vectors are the "
        "scaled test losses `w_t * L_t` (lower is better).",
        f"Hypervolume reference point: {[round(v, 4) for v in result.reference_point]} "
        f"({result.reference_point_source}).", "",
        f"## Controlled trade-offs ({len(result.records[0].preferences)} preferences r ~ Dirichlet(1) per c)",
        "", "HV / anchor's: the hypervolume over the single-task anchor's at the same c.", "",
        "| method | BN adaptation | c | hypervolume | HV / anchor's | uniformity | mean params | mean GFLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in result.records:
        ratio = rec.hypervolume_ratio
        lines.append(f"| {method_label(rec.method)} | {'yes' if rec.adaptation else 'no'} | {rec.c:g} | "
                     f"{rec.hypervolume:.4g} ({rec.hypervolume_method}) | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {rec.uniformity:.4f} | "
                     f"{rec.mean_params:,.0f} | {rec.mean_gflops:.4f} |")
    lines += ["", "## Inference cost of the pruned model", "",
              f"Anchor (N single-task networks): {anchor['params']:,} parameters, {anchor['gflops']:.4f} GFLOPs "
              f"(batch 1, torch.utils.flop_counter). Control parameters (hypernets): "
              f"{result.control_params:,}.", "",
              "| preferences | count | mean params | fraction of anchor | mean GFLOPs |", "| --- | --- | --- | --- | --- |"]
    for summary in result.inference_cost:
        name = cost_label(summary, len(result.tasks))
        if summary.count == 0:
            lines.append(f"| {name} | 0 | - | - | - |")
            continue
        lines.append(f"| {name} | {summary.count} | {summary.mean_params:,.0f} | "
                     f"{summary.mean_params / anchor['params']:.3f} | {summary.mean_gflops:.4f} |")
    grid = result.controllability
    cs = list(grid[0]["params"])
    lines += ["", "## Parameters by preference and c", "",
              "| preference | " + " | ".join(f"c={c}" for c in cs) + " |",
              "| --- | " + " | ".join("---" for _ in cs) + " |"]
    for row in grid:
        lines.append(f"| {row['preference']} | " + " | ".join(
            f"{row['params'][c]:,} (`{row['architecture'][c].replace(' | ', ' / ')}`)" for c in cs) + " |")
    lines += ["", "Trees are written `parents of layer 1 / ... / parents of the heads`, one stream index per "
              "task.", ""]
    if result.budget_records:
        metric = result.budget_records[0].budget_metric
        lines += ["## Budgets", "",
                  f"The evaluation preferences' trees at c = 0 within a budget B (a fraction of the anchor's {metric}).",
                  "", f"| budget B | BN adaptation | HV / anchor's | uniformity | mean {metric} / anchor's | "
                  "largest / anchor's | all within B |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for rec in result.budget_records:
            ratio = rec.hypervolume_ratio
            lines.append(f"| {rec.budget:g} | {'yes' if rec.adaptation else 'no'} | "
                         f"{'-' if ratio is None else f'{ratio:.3f}'} | {rec.uniformity:.4f} | "
                         f"{rec.mean_fraction:.3f} | {rec.max_fraction:.3f} | "
                         f"{'yes' if rec.within_budget else 'NO'} |")
        lines.append("")
    calibration = result.controller
    if calibration:
        quartiles = ", ".join(f"{v:.2f}" for v in calibration["break_even_c_quartiles"])
        uniform = ", ".join(f"{v:.2f}" for v in calibration["uniform_break_even_c"]) or "none"
        lines += ["## Controller", "",
                  f"Measured controller (docs/controllability.md): trade-off lambda = {calibration['trade_off']:.4g}, "
                  f"base frugality gamma = {calibration['base_frugality']:g}, cost = {calibration['cost_metric']}. "
                  f"Over {calibration['preferences']} calibration preferences, the {calibration['steps']} sharing "
                  f"steps break even at c = {quartiles} (quartiles); the uniform preference's at c = {uniform}.", ""]
    plots = result.plots or {}
    captions = {
        "resource_usage": "used-parameter fraction of the pruned model (of the anchor's) over the task simplex, "
                          "one panel per c (the paper's figure 5)",
        "marginal_controllability": "each task's scaled test loss against its own preference r_t, c in {0, 1}, "
                                    "with and without adaptation; dashed: the single-task anchor (the paper's "
                                    "figure 7)",
        "trees": "the trees of the uniform and one-hot preferences at c = 0, 0.5 and 1, used nodes filled and "
                 "cross-task edges dashed (the paper's figures 16-17; `dymu show --grid` prints them as text)",
        "cost_accuracy": "hypervolume over the anchor's against mean parameters over the anchor's: dymu at c = 0 "
                         "and 1, within each budget, and the baselines of `dymu compare` when the run has them",
    }
    if plots:
        lines += ["## Figures", ""]
        for name, file in plots.items():
            lines += [f"- `{file}`: {captions.get(name, name)}.", "", f"![{name}]({file})", ""]
    return "\n".join(lines)


def budget_list(text: str) -> list[float]:
    """``--budgets 1,0.8,0.6``: the fractions, each in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets must be comma-separated numbers like 1,0.8,0.6, got {text!r}") \
            from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be fractions of the anchor's cost in (0, 1], got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu evaluate", description=__doc__)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--num_preferences", type=int, default=None, help="default 20")
    parser.add_argument("--num_cost_preferences", type=int, default=None, help="default 1000")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--max_batches", type=int, default=None,
                        help="default: the whole test split (per process under DDP)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:<index> (default: cuda if available)")
    parser.add_argument("--devices", type=int, default=None, help="processes, DDP when > 1 (default 1)")
    parser.add_argument("--budgets", type=budget_list, default=None,
                        help="comma-separated fractions of the anchor's cost, e.g. 1,0.8,0.6,0.5: also the trees "
                             "within each budget (c = 0), and cost_accuracy.png")
    parser.add_argument("--budget_metric", choices=["params", "flops"], default=None, help="default params")
    parser.add_argument("--recalibrate_batches", type=int, default=None,
                        help="also evaluate each tree with BatchNorm statistics re-estimated on K training batches")
    args = parser.parse_args(argv)
    layout = RunLayout(args.run_dir)
    config = None
    if layout.pipeline_config.is_file():  # the run's config, read once; the flags override its evaluate section
        from stages.pipeline import run_config

        config = run_config(layout.root, [f"evaluate.{k}={json.dumps(v)}" for k, v in vars(args).items()
                                          if k != "run_dir" and v is not None])
    options = config.evaluate_given() if config is not None else \
        {k: v for k, v in vars(args).items() if k != "run_dir" and v is not None}
    import torch

    options.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    evaluation_options(options)  # checked (types, names) before anything loads
    trainer_device(str(options["device"]), int(options.get("devices") or 1))
    check_run(args.run_dir)
    with run_lock(args.run_dir, "evaluate", create=False):
        evaluate_run(args.run_dir, **options, data=config.data if config is not None else None)
    return 0
