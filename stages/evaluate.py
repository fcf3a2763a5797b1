"""``dymu evaluate --run_dir D``: METHOD.md's evaluation protocol on a finished run.

Writes ``<run_dir>/evaluation/metrics.json`` (one record per method, adaptation and c, with the
per-preference loss vectors and trees), ``report.md`` and its figures (``stages.plots``): resource usage over
the task simplex and marginal controllability.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dymu.evaluation import (
    controllability_grid,
    cost_summary,
    front_summary,
    mean_task_losses,
    preference_records,
    scaled,
)
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference, cost_preferences, evaluation_preferences
from dymu.search_space import Architecture
from stages.common import build_data, read_yaml
from stages.plots import write_plots


def test_batches(data_config: dict[str, Any], max_batches: int | None) -> tuple[list[dict], list]:
    data = build_data(data_config)
    data.setup("test")
    batches = []
    for i, batch in enumerate(data.test_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        batches.append(batch)
    return batches, data.tasks


def training_images(data_config: dict[str, Any], num_batches: int) -> list[torch.Tensor]:
    """The images of the first ``num_batches`` training batches (for BatchNorm recalibration)."""
    data = build_data(data_config)
    data.setup("fit")
    images = []
    for batch in data.train_dataloader():
        images.append(batch["image"])
        if len(images) >= num_batches:
            break
    return images


def run_data_config(run_dir: Path) -> dict[str, Any]:
    """The data config of a run: its pipeline config's (``dymu run``, sweep trials), else the anchor stage's."""
    for name in ("pipeline.yaml", "anchor.yaml"):
        path = run_dir / "configs" / name
        if path.is_file():
            return read_yaml(path)["data"]
    raise FileNotFoundError(f"{run_dir} holds no configs/pipeline.yaml or configs/anchor.yaml: is it a run "
                            "directory written by `dymu run`?")


def with_hypervolume_ratios(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``records`` with ``hypervolume_ratio``: the hypervolume over the single-task anchor's at the
    same ``c`` (the anchor's own record gets 1), placed after ``hypervolume_method``.

    The ratio is None where no anchor record has that ``c`` or the anchor's hypervolume is 0.
    """
    anchor_hv = {rec["c"]: rec["hypervolume"] for rec in records if rec["method"] == "single-task anchor"}
    out = []
    for rec in records:
        base = anchor_hv.get(rec["c"])
        ratio = rec["hypervolume"] / base if base else None
        new: dict[str, Any] = {}
        for key, value in rec.items():
            if key != "hypervolume_ratio":
                new[key] = value
            if key == "hypervolume_method":
                new["hypervolume_ratio"] = ratio
        new.setdefault("hypervolume_ratio", ratio)
        out.append(new)
    return out


def evaluate_run(run_dir: str | Path, num_preferences: int = 20, num_cost_preferences: int = 1000,
                 seed: int = 0, reference_point: Sequence[float] | None = None,
                 max_batches: int | None = None, device: str = "cpu", recalibrate_batches: int = 0
                 ) -> dict[str, Any]:
    """Evaluate a run directory and write ``evaluation/metrics.json``, ``evaluation/report.md`` and the
    report's figures (``evaluation/resource_usage.png``, ``evaluation/marginal_controllability.png``).

    Args:
        run_dir: holds ``configs/anchor.yaml`` (its data section) and the stage checkpoints.
        num_preferences: preferences ``r ~ Dirichlet(1)`` per ``c`` in {0, 1} for hypervolume/uniformity.
        num_cost_preferences: preferences ``(r, c)`` over which the inference cost is averaged.
        seed: seed of both preference sets.
        reference_point: hypervolume reference (scaled losses); default: twice the single-task anchor's
            scaled test losses (stated in the report).
        max_batches: evaluate on at most this many test batches (default: the whole test split).
        recalibrate_batches: if > 0, add the method "dymu, recalibrated BN": each tree without adaptation,
            its BatchNorm statistics re-estimated on this many training batches.
    """
    run_dir = Path(run_dir)
    model = DynamicMultiTaskModel.from_run(run_dir).to(device)
    batches, tasks = test_batches(run_data_config(run_dir), max_batches)
    n = model.n_tasks

    anchor_losses = scaled(mean_task_losses(model.anchor, batches, tasks, device), tasks)
    ref_source = "configured"
    if reference_point is None:
        reference_point, ref_source = [2.0 * v for v in anchor_losses], "2 x single-task anchor losses"
    if len(reference_point) != n:
        raise ValueError(f"reference_point has {len(reference_point)} entries, the model has {n} tasks")

    anchor_cost = model.node_costs().cost(Architecture.anchor(n, model.anchor.n_layers))
    records: list[dict[str, Any]] = []
    for c in (0.0, 1.0):
        prefs = evaluation_preferences(n, num_preferences, c=c, seed=seed)
        anchor_recs = [{"r": list(p.r), "c": c, "architecture": Architecture.anchor(n, model.anchor.n_layers)
                        .to_list(), "losses": anchor_losses, **anchor_cost} for p in prefs]
        records.append({"method": "single-task anchor", "adaptation": False, "c": c,
                        **front_summary(anchor_recs, reference_point), "preferences": anchor_recs})
        for adapt in ([False, True] if model.weight_hypernet is not None else [False]):
            recs = preference_records(model, prefs, batches, tasks, adapt=adapt, device=device)
            records.append({"method": "dymu", "adaptation": adapt, "c": c,
                            **front_summary(recs, reference_point), "preferences": recs})
        if recalibrate_batches > 0:
            if c == 0.0:
                calibration = training_images(run_data_config(run_dir), recalibrate_batches)
            recs = preference_records(model, prefs, batches, tasks, adapt=False, device=device,
                                      recalibrate=calibration)
            records.append({"method": "dymu, recalibrated BN", "adaptation": False, "c": c,
                            **front_summary(recs, reference_point), "preferences": recs})

    cost_prefs = cost_preferences(n, num_cost_preferences, seed=seed)
    max_r = np.array([max(p.r) for p in cost_prefs])
    groups = {"": cost_prefs, "focused (max r >= 0.9)": [p for p, m in zip(cost_prefs, max_r) if m >= 0.9],
              f"near-uniform (max r <= {1.5 / n:.2f})": [p for p, m in zip(cost_prefs, max_r) if m <= 1.5 / n]}
    costs: dict[str, dict[str, Any] | None] = {"all": cost_summary(model, cost_prefs)}
    for label, group in groups.items():
        for c in (0.0, 1.0):
            name = f"{label}, c={c:g}" if label else f"c={c:g}"
            costs[name] = cost_summary(model, [Preference(p.r, c) for p in group]) if group else None
    result = {
        "tasks": model.tasks,
        "reference_point": list(reference_point),
        "reference_point_source": ref_source,
        "num_test_samples": sum(int(b["image"].shape[0]) for b in batches),
        "anchor": {"params": anchor_cost["params"], "gflops": anchor_cost["flops"] / 1e9,
                   "losses": anchor_losses},
        "control_params": model.control_parameters(),
        "inference_cost": costs,
        "controllability": controllability_grid(model),
        "records": with_hypervolume_ratios(records),
    }
    out_dir = run_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = write_plots(model, result, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    (out_dir / "report.md").write_text(render_report(result))
    print(render_report(result))
    return result


def render_report(result: dict[str, Any]) -> str:
    """The human-readable report of ``evaluate_run``'s result."""
    anchor = result["anchor"]
    lines = [
        "# dymu evaluation", "",
        f"Tasks: {', '.join(result['tasks'])}. Test samples: {result['num_test_samples']}. Loss vectors are the "
        "scaled test losses `w_t * L_t` (lower is better).",
        f"Hypervolume reference point: {[round(v, 4) for v in result['reference_point']]} "
        f"({result['reference_point_source']}).", "",
        f"## Controlled trade-offs ({len(result['records'][0]['preferences'])} preferences r ~ Dirichlet(1) per c)",
        "", "HV / anchor's: the hypervolume over the single-task anchor's at the same c.", "",
        "| method | BN adaptation | c | hypervolume | HV / anchor's | uniformity | mean params | mean GFLOPs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rec in result["records"]:
        ratio = rec.get("hypervolume_ratio")
        lines.append(f"| {rec['method']} | {'yes' if rec['adaptation'] else 'no'} | {rec['c']:g} | "
                     f"{rec['hypervolume']:.4g} ({rec['hypervolume_method']}) | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {rec['uniformity']:.4f} | "
                     f"{rec['mean_params']:,.0f} | {rec['mean_gflops']:.4f} |")
    lines += ["", "## Inference cost of the pruned model", "",
              f"Anchor (N single-task networks): {anchor['params']:,} parameters, {anchor['gflops']:.4f} GFLOPs "
              f"(batch 1, torch.utils.flop_counter). Control parameters (hypernets): "
              f"{result['control_params']:,}.", "",
              "| preferences | count | mean params | fraction of anchor | mean GFLOPs |", "| --- | --- | --- | --- | --- |"]
    for name, summary in result["inference_cost"].items():
        if summary is None:
            lines.append(f"| {name} | 0 | - | - | - |")
            continue
        lines.append(f"| {name} | {summary['count']} | {summary['mean_params']:,.0f} | "
                     f"{summary['mean_params'] / anchor['params']:.3f} | {summary['mean_gflops']:.4f} |")
    grid = result["controllability"]
    cs = list(grid[0]["params"])
    lines += ["", "## Parameters by preference and c", "",
              "| preference | " + " | ".join(f"c={c}" for c in cs) + " |",
              "| --- | " + " | ".join("---" for _ in cs) + " |"]
    for row in grid:
        lines.append(f"| {row['preference']} | " + " | ".join(
            f"{row['params'][c]:,} (`{row['architecture'][c]}`)" for c in cs) + " |")
    lines += ["", "Trees are written `parents of layer 1 | ... | parents of the heads`, one stream index per "
              "task.", ""]
    plots = result.get("plots") or {}
    captions = {
        "resource_usage": "used-parameter fraction of the pruned model (of the anchor's) over the task simplex, "
                          "one panel per c (the paper's figure 5)",
        "marginal_controllability": "each task's scaled test loss against its own preference r_t, c in {0, 1}, "
                                    "with and without adaptation; dashed: the single-task anchor (the paper's "
                                    "figure 7)",
    }
    if plots:
        lines += ["## Figures", ""]
        for name, file in plots.items():
            lines += [f"- `{file}`: {captions.get(name, name)}.", "", f"![{name}]({file})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu evaluate", description=__doc__)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--num_preferences", type=int, default=None, help="default 20")
    parser.add_argument("--num_cost_preferences", type=int, default=None, help="default 1000")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--max_batches", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recalibrate_batches", type=int, default=None,
                        help="also evaluate each tree with BatchNorm statistics re-estimated on K training batches")
    args = parser.parse_args(argv)
    pipeline = Path(args.run_dir) / "configs" / "pipeline.yaml"
    options = (read_yaml(pipeline).get("evaluate") or {}) if pipeline.is_file() else {}
    options.update({k: v for k, v in vars(args).items() if k != "run_dir" and v is not None})
    evaluate_run(args.run_dir, **options)
    return 0
