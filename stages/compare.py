"""``dymu compare --run_dir D``: the paper's comparison (its tables 1-4 and figure 6) on one run.

Trains the baselines that ``D`` lacks (PHN, PHN-BN with its shared parent, K static multi-task networks; the
stage table's ``phn``, ``shared_mtl``, ``phn_bn`` and ``static`` stages, on D's data, backbone and seed, with
the pipeline config's sections for them), evaluates them with the protocol of ``dymu evaluate`` (the same
preferences, reference point and streaming test loop), and writes ``D/compare/``: ``metrics.json``
(``stages.results.ComparisonResult``: typed rows, labelled by ``compare_label``), ``report.md`` with the table
in the paper's layout, and figure 6 (hypervolume against training wall-clock time: ours against random subsets
of the K static networks). With ``--architectures`` it also trains the tree
searches, feature partitioning and the retrained trees (``ARCHITECTURE_STAGES``) and adds the architecture
evaluation, the paper's tables 5 and 7 (``architecture_rows``), as its own section of the report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dymu.layout import RunLayout
from stages.graph import STAGES
from stages.results import CompareKind, CompareRow, ComparisonResult, EvaluationResult, Method, compare_label

if TYPE_CHECKING:  # torch and the models are imported where used: `dymu compare --help` is fast
    from torch import nn

    from dymu.preference import Preference
    from stages.pipeline import PipelineConfig

BASELINES = ("phn", "phn_bn", "static")
"""The compared methods' stages (``phn_bn`` brings its parent ``shared_mtl``)."""
SUBSETS = 20
"""Random subsets of the static networks per subset size in figure 6."""


def front_hypervolume(points: Sequence[Sequence[float]], reference_point: Sequence[float]) -> float:
    """The hypervolume of a set of scaled loss vectors (the protocol's algorithm choice)."""
    from dymu.metrics import hypervolume, hypervolume_method

    arr = np.asarray(points, dtype=float)
    return hypervolume(arr, np.asarray(reference_point, dtype=float),
                       method=hypervolume_method(len(arr), arr.shape[1]))


def static_subset_curve(losses: Sequence[Sequence[float]], seconds: Sequence[float | None],
                        reference_point: Sequence[float], subsets: int = SUBSETS, seed: int = 0
                        ) -> list[dict[str, Any]]:
    """Figure 6's static curve: for each subset size k of the K static networks, the hypervolume of the
    subset's loss vectors and its training time (sum of its networks'), as mean and standard deviation over
    ``subsets`` random subsets (every subset when there are at most that many).

    Returns:
        One entry per k: ``k``, ``subsets`` (how many were drawn), ``hv_mean``, ``hv_std``, ``seconds_mean``
        (None when a network's training time is unknown).
    """
    k_total = len(losses)
    if k_total != len(seconds):
        raise ValueError(f"{k_total} loss vectors but {len(seconds)} training times")
    rng = np.random.default_rng(seed)
    curve = []
    for k in range(1, k_total + 1):
        if math.comb(k_total, k) <= subsets:
            picks = [list(c) for c in itertools.combinations(range(k_total), k)]
        else:
            picks = [sorted(rng.choice(k_total, size=k, replace=False).tolist()) for _ in range(subsets)]
        hvs = [front_hypervolume([losses[i] for i in pick], reference_point) for pick in picks]
        times = [None if any(seconds[i] is None for i in pick) else float(sum(seconds[i] for i in pick))
                 for pick in picks]
        known = [t for t in times if t is not None]
        curve.append({"k": k, "subsets": len(picks), "hv_mean": float(np.mean(hvs)), "hv_std": float(np.std(hvs)),
                      "seconds_mean": float(np.mean(known)) if len(known) == len(times) else None})
    return curve


def stage_seconds(layout: RunLayout, folders: Sequence[str]) -> float | None:
    """Training wall-clock seconds of the stages in ``folders`` (from their final checkpoints); None when one
    does not record it (trained before the time was recorded)."""
    import torch

    from stages.stage_cli import train_seconds

    total = 0.0
    for folder in folders:
        value = train_seconds(torch.load(layout.final(folder), map_location="cpu", weights_only=True))
        if value is None:
            return None
        total += value
    return total


def baseline_networks(layout: RunLayout, config: PipelineConfig, methods: Sequence[str],
                      prefs: Sequence[Preference]) -> tuple[dict[Hashable, nn.Module], dict[str, dict[str, Any]]]:
    """Every network the comparison scores, keyed ``(method, k)``, and per method its preferences, costs,
    control parameters and training time. PHN and PHN-BN run each of ``prefs``; static network k runs the
    preference it was trained for."""
    import torch

    from dymu.anchor import count_parameters
    from dymu.baselines.base import load_baseline, preference_network

    networks: dict[Hashable, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for method in methods:
            if method == "static":
                folders = [folder for folder, _ in STAGES["static"].instances(config)]
                models = [load_baseline(layout.final(f)) for f in folders]
                rs = [list(m.trained_preference.r) for m in models]  # type: ignore[attr-defined]
                for k, m in enumerate(models):
                    networks[(method, k)] = m.inference_network()
                seconds = [stage_seconds(layout, [f]) for f in folders]
                info[method] = {"r": rs, "cost": models[0].cost(), "control_params": 0,
                                "stored_params": sum(count_parameters(m) for m in models), "seconds": seconds,
                                "train_seconds": None if None in seconds else float(sum(seconds))}  # type: ignore
                continue
            model = load_baseline(layout.final(method))
            for k, p in enumerate(prefs):
                networks[(method, k)] = preference_network(model, p.r)
            folders = [*(["shared_mtl"] if method == "phn_bn" else []), method]
            info[method] = {"r": [list(p.r) for p in prefs], "cost": model.cost(),
                            "control_params": model.control_parameters(),
                            "stored_params": count_parameters(model), "train_seconds": stage_seconds(layout, folders)}
    return networks, info


def compare_run(run_dir: str | Path, methods: Sequence[str] = BASELINES, overrides: Sequence[str] = (),
                subsets: int = SUBSETS, max_batches: int | None = None, device: str = "cpu",
                baselines_from: str | Path | None = None, architectures: bool = False) -> dict[str, Any]:
    """Train the missing baselines of a run, score them with the evaluation protocol and write
    ``compare/metrics.json``, ``compare/report.md`` and figure 6 (see the module docstring).

    Args:
        baselines_from: a pipeline config whose baseline sections are added to the run's config where it has
            none (a run made before its config had them).
        architectures: also train the architecture evaluation's stages (``ARCHITECTURE_STAGES``) and add its
            table (``architecture_rows``, the paper's tables 5 and 7) as ``architectures``.
    """
    from dymu.anchor import count_parameters
    from dymu.evaluation import front_summary
    from dymu.model import DynamicMultiTaskModel
    from dymu.preference import evaluation_preferences
    from lightning_modules.evaluation import ModulesEvaluation
    from stages.evaluate import stream_test_losses
    from stages.graph import order
    from stages.pipeline import load_pipeline_config, run_config
    from stages.runner import check_stage_sections, evaluate_if_stale, run_pipeline

    layout = RunLayout(Path(run_dir).resolve())
    if not layout.pipeline_config.is_file():
        raise FileNotFoundError(f"{layout.root} holds no {layout.pipeline_config.relative_to(layout.root)}: "
                                "`dymu compare` takes a run directory written by `dymu run`")
    unknown = sorted(set(methods) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(BASELINES)}")
    config = run_config(layout.root, overrides)
    if baselines_from is not None:
        source = load_pipeline_config(baselines_from)
        added = [s for s in STAGES if not STAGES[s].in_pipeline and source.has_section(s) and not config.has_section(s)]
        if added:
            config = config.with_sections(source, added)
    extra = ARCHITECTURE_STAGES if architectures else ()
    check_stage_sections(config, order((*methods, *extra)), hint="take them from a config with --baselines_from "
                         "configs/quickstart.yaml, or set them")
    # DYMU's own stages are skipped when finished; the baselines train once and are skipped on a rerun
    run_pipeline(config, layout.root, evaluate=False, stages=("weight", *methods, *extra))
    evaluate_if_stale(layout, config)
    ours = EvaluationResult.read(layout.metrics, "delete it and rerun `dymu compare`: it evaluates the run again")
    n, reference_point = len(ours.tasks), list(ours.reference_point)
    prefs = evaluation_preferences(n, int(config.evaluate["num_preferences"]), c=0.0, seed=int(config.evaluate["seed"]))
    networks, info = baseline_networks(layout, config, methods, prefs)
    losses, _, _ = stream_test_losses(lambda tasks: ModulesEvaluation(networks, tasks), config.data,
                                      max_batches, device, 1, layout.compare_dir)

    model = DynamicMultiTaskModel.from_checkpoint(layout.model_checkpoint())
    edge_params = count_parameters(model.edge_hypernet) if model.edge_hypernet is not None else 0
    anchor_s, edge_s = stage_seconds(layout, ["anchor"]), stage_seconds(layout, ["edge"])
    weight_s = stage_seconds(layout, ["weight"]) if layout.final("weight").is_file() else None
    rows: list[CompareRow] = []
    anchor_rec = ours.record(Method.ANCHOR, c=0.0)
    if anchor_rec is None:
        raise ValueError(f"{layout.metrics} has no single-task anchor record at c = 0; delete it and rerun "
                         "`dymu compare`: it evaluates the run again")
    rows.append(CompareRow(CompareKind.SINGLE_TASK, hypervolume=anchor_rec.hypervolume, hv_ratio=1.0, uniformity=None,
                           params=ours.anchor["params"], gflops=ours.anchor["gflops"], control_params=None,
                           train_seconds=anchor_s))
    records: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        item = info[method]
        recs = [{"r": r, "losses": losses[(method, k)], **item["cost"]} for k, r in enumerate(item["r"])]
        records[method] = recs
        summary = front_summary(recs, reference_point)
        kind = CompareKind(method)
        rows.append(CompareRow(kind, hypervolume=summary["hypervolume"],
                               hv_ratio=summary["hypervolume"] / anchor_rec.hypervolume if anchor_rec.hypervolume
                               else None, uniformity=summary["uniformity"], params=item["cost"]["params"],
                               gflops=item["cost"]["flops"] / 1e9, control_params=item["control_params"],
                               stored_params=item["stored_params"], train_seconds=item["train_seconds"],
                               networks=len(recs) if kind is CompareKind.STATIC else None))
    for adapt in (False, True):
        for c in (0.0, 1.0):
            rec = ours.record(Method.DYMU, adapt, c)
            if rec is None:
                continue
            seconds = None if None in (anchor_s, edge_s, *( [weight_s] if adapt else [])) else \
                anchor_s + edge_s + (weight_s if adapt else 0.0)  # type: ignore[operator]
            rows.append(CompareRow(CompareKind.OURS, adaptation=adapt, c=c, hypervolume=rec.hypervolume,
                                   hv_ratio=rec.hypervolume_ratio, uniformity=rec.uniformity, params=rec.mean_params,
                                   gflops=rec.mean_gflops, control_params=ours.control_params if adapt else edge_params,
                                   train_seconds=seconds))
    curve = None
    if "static" in methods:
        curve = static_subset_curve([r["losses"] for r in records["static"]], info["static"]["seconds"],
                                    reference_point, subsets=subsets, seed=int(config.evaluate["seed"]))
    result = ComparisonResult(tasks=ours.tasks, reference_point=tuple(reference_point), preferences=len(prefs),
                              rows=tuple(rows), static_curve=curve, records=records,
                              static_match=static_match(rows, curve))
    if architectures:
        result = replace(result, architectures=architecture_rows(layout, config, max_batches, device))
    layout.compare_dir.mkdir(parents=True, exist_ok=True)
    result = replace(result, plot=plot_training_efficiency(rows, curve, layout.compare_plot))
    layout.compare_metrics.write_text(json.dumps(result.to_json(), indent=1))
    layout.compare_report.write_text(render_report(result))
    return result.to_json()


def static_match(rows: Sequence[CompareRow], curve: Sequence[dict[str, Any]] | None) -> dict[str, Any] | None:
    """How many static networks (and how much of their training time) it takes to reach ours' hypervolume
    (with adaptation at c = 0): the paper's figure-6 claim, as numbers."""
    ours = next((r for r in rows if r.matches(CompareKind.OURS, adaptation=True, c=0.0)), None)
    if ours is None or not curve:
        return None
    reached = next((p for p in curve if p["hv_mean"] >= ours.hypervolume), None)
    match = {"ours_hypervolume": ours.hypervolume, "ours_seconds": ours.train_seconds,
             "static_k": None if reached is None else reached["k"],
             "static_seconds": None if reached is None else reached["seconds_mean"],
             "all_static_hypervolume": curve[-1]["hv_mean"], "all_static_seconds": curve[-1]["seconds_mean"]}
    return {**match, "ours_first": ours_reaches_static_first(match)}


def ours_reaches_static_first(match: dict[str, Any]) -> bool | None:
    """Figure 6's claim for one run (a ``static_match``): ours reaches the static networks' hypervolume in less
    training time, against the first k networks that reach ours' hypervolume, or against all K when every
    subset stays below it. None when a training time is unknown."""
    seconds = match["static_seconds"] if match["static_k"] is not None else match["all_static_seconds"]
    if seconds is None or match["ours_seconds"] is None:
        return None
    return match["ours_seconds"] < seconds


def plot_training_efficiency(rows: Sequence[CompareRow], curve: Sequence[dict[str, Any]] | None,
                             path: Path) -> str:
    """Figure 6: hypervolume against training wall-clock time; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if curve and all(p["seconds_mean"] is not None for p in curve):
        xs = [p["seconds_mean"] for p in curve]
        ax.errorbar(xs, [p["hv_mean"] for p in curve], yerr=[p["hv_std"] for p in curve], marker="o", ms=3,
                    capsize=2, label="static networks (k of K, mean ± sd over subsets)")
    for row in rows:
        if row.train_seconds is not None and row.kind is not CompareKind.STATIC:
            ax.scatter([row.train_seconds], [row.hypervolume], marker="*" if row.kind is CompareKind.OURS else "s",
                       s=80, label=compare_label(row), zorder=3)
    ax.set_xlabel("training wall-clock time (s)")
    ax.set_ylabel("hypervolume (c = 0 preferences)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_report(result: ComparisonResult | dict[str, Any]) -> str:
    """The comparison in the layout of the paper's tables 1-4, and figure 6's numbers (from ``compare_run``'s
    result, typed or its JSON)."""
    if not isinstance(result, ComparisonResult):
        result = ComparisonResult.from_json(result)
    lines = ["# dymu compare", "",
             f"Tasks: {', '.join(result.tasks)}. Hypervolume over {result.preferences} preferences "
             f"r ~ Dirichlet(1) (the evaluation's), reference point {[round(v, 4) for v in result.reference_point]} "
             "(scaled test losses). Training time: wall-clock seconds of the stages' training loops "
             "(ours: anchor + edge (+ weight); PHN-BN: its shared parent + its hypernet).", "",
             "| method | hypervolume | HV / single-task | uniformity | inference params | GFLOPs | control params "
             "| training time (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result.rows:
        control = _fmt(row.control_params, ",")
        if row.kind is CompareKind.STATIC:
            control = f"- ({row.stored_params:,} stored)"
        lines.append(f"| {compare_label(row)} | {row.hypervolume:.4g} | {_fmt(row.hv_ratio, '.3f')} | "
                     f"{_fmt(row.uniformity, '.3f')} | {row.params:,.0f} | {row.gflops:.4f} | {control} | "
                     f"{_fmt(row.train_seconds, '.0f')} |")
    match = result.static_match
    if match:
        lines += ["", "## Training efficiency (figure 6)", "",
                  f"![training efficiency]({result.plot})", ""]
        if match["static_k"] is None:
            lines.append(f"No subset of the static networks reaches ours' hypervolume ({match['ours_hypervolume']:.4g});"
                         f" all {len(result.static_curve or [])} reach {match['all_static_hypervolume']:.4g} in "
                         f"{_fmt(match['all_static_seconds'], '.0f')} s against ours' "
                         f"{_fmt(match['ours_seconds'], '.0f')} s.")
        else:
            lines.append(f"The static networks reach ours' hypervolume ({match['ours_hypervolume']:.4g}, in "
                         f"{_fmt(match['ours_seconds'], '.0f')} s of training) with {match['static_k']} networks "
                         f"on average, trained in {_fmt(match['static_seconds'], '.0f')} s.")
    if result.architectures:
        lines += ["", *render_architectures(result.architectures)]
    return "\n".join(lines) + "\n"


ARCHITECTURE_STAGES = ("ltb", "bmtas", "feature_partitioning", "retrain")
"""The architecture evaluation's stages (``dymu compare --architectures``): the two tree searches, feature
partitioning's trained network and the retrained trees (``stages.graph.retrain_instances``)."""
TREE_LABELS = {"ltb": "LTB", "bmtas": "BMTAS"}
SCRATCH_MARK = "†"
"""Marks a tree retrained from scratch (the paper's dagger: from ImageNet, i.e. the backbone's initialisation)."""


def architecture_label(folder: str, tree_from: dict[str, Any], init: str) -> tuple[tuple[int, float, int], str]:
    """A retrained tree's row label in the paper's style (``ours †, c=0``: our tree for c = 0 retrained from scratch)
    and its place in the table (LTB, BMTAS, then ours by c; anchor init before scratch)."""
    mark = f" {SCRATCH_MARK}" if init == "scratch" else ""
    stage = tree_from.get("stage", "")
    init_order = 0 if init == "anchor" else 1
    if stage in TREE_LABELS:
        return (list(TREE_LABELS).index(stage), 0.0, init_order), f"{TREE_LABELS[stage]}{mark}"
    if "c" in tree_from:
        c = float(tree_from["c"])
        return (3, c, init_order), f"ours{mark}, c={c:g}"
    return (4, 0.0, init_order), f"{folder}{mark}"


def architecture_rows(layout: RunLayout, config: PipelineConfig, max_batches: int | None = None,
                      device: str = "cpu") -> dict[str, Any]:
    """The architecture evaluation (the paper's tables 5 and 7): the single-task anchor, every retrained tree of the
    ``retrain`` stage and feature partitioning's network, scored in one streamed pass over the test split
    (``TaskMetricsEvaluation``: each task's torchmetrics metric and its scaled loss), with ``Delta_m`` against the
    single-task anchor (``dymu.metrics.delta_m``, in %) and the change of inference parameters against it (%).

    Returns:
        ``tasks``, ``metric_names``, ``higher_is_better`` and ``rows`` (label, folder, tree, init, metrics, losses,
        delta_m_percent, params, params_change_percent).
    """
    from dymu.anchor import count_parameters
    from dymu.baselines.base import load_baseline, preference_network
    from dymu.metrics import delta_m
    from dymu.model import DynamicMultiTaskModel
    from dymu.preference import Preference
    from lightning_modules.retrain import TaskMetricsEvaluation
    from stages.evaluate import stream_test_losses

    anchor = DynamicMultiTaskModel.from_checkpoint(layout.final("anchor")).anchor.eval()
    networks: dict[Hashable, nn.Module] = {"single-task": anchor}
    entries: list[dict[str, Any]] = [{"key": "single-task", "order": (-1, 0.0, 0), "method": "single-task",
                                      "folder": "anchor", "tree": None, "init": None,
                                      "params": count_parameters(anchor)}]
    for folder, args in STAGES["retrain"].instances(config):
        model = load_baseline(layout.final(folder))
        order, label = architecture_label(folder.split("/", 1)[-1], args["tree_from"], args["init"])
        networks[folder] = preference_network(model, Preference.uniform(model.n_tasks).r)
        entries.append({"key": folder, "order": order, "method": label, "folder": folder,
                        "tree": model.architecture().to_list(), "init": args["init"],  # type: ignore[operator]
                        "params": model.cost()["params"]})
    fp = load_baseline(layout.final("feature_partitioning"))
    networks["feature_partitioning"] = preference_network(fp, Preference.uniform(fp.n_tasks).r)
    entries.append({"key": "feature_partitioning", "order": (2, 0.0, 0), "method": "feature partitioning",
                    "folder": "feature_partitioning", "tree": None, "init": None, "params": fp.cost()["params"]})

    evaluation: dict[str, Any] = {}

    def factory(tasks: Sequence[Any]) -> TaskMetricsEvaluation:
        evaluation["tasks"] = list(tasks)
        evaluation["module"] = TaskMetricsEvaluation(networks, tasks)
        return evaluation["module"]

    losses, _, _ = stream_test_losses(factory, config.data, max_batches, device, 1,
                                      layout.compare_dir)
    tasks, metrics = evaluation["tasks"], evaluation["module"].metrics
    lower = [not t.higher_is_better for t in tasks]
    single, single_params = metrics["single-task"], entries[0]["params"]
    rows = []
    for entry in sorted(entries, key=lambda e: e["order"]):
        key = entry.pop("key")
        entry.pop("order")
        is_single = key == "single-task"
        rows.append({**entry, "metrics": metrics[key], "losses": losses[key],
                     "delta_m_percent": None if is_single else 100 * delta_m(metrics[key], single, lower),
                     "params_change_percent": None if is_single else 100 * (entry["params"] / single_params - 1)})
    return {"tasks": [t.name for t in tasks], "metric_names": [t.metric_name for t in tasks],
            "higher_is_better": [t.higher_is_better for t in tasks], "rows": rows}


def render_architectures(table: dict[str, Any]) -> list[str]:
    """The architecture evaluation's report section, in the layout of the paper's tables 5 and 7."""
    arrows = ["↑" if h else "↓" for h in table["higher_is_better"]]
    heads = [f"{task} {metric} {arrow}" for task, metric, arrow in zip(table["tasks"], table["metric_names"], arrows)]
    lines = ["## Architecture evaluation (tables 5 and 7)", "",
             "Each tree retrained on the uniform preference's objective, from the anchor's weights or from scratch "
             f"({SCRATCH_MARK}: the backbone's initialisation; ImageNet for a pretrained backbone, the paper's dagger; "
             "the papers of LTB and BMTAS retrain from scratch / ImageNet). Ours: the tree for the uniform preference. "
             "Feature partitioning: its stage's trained network. Test-set metrics (torchmetrics); Delta_m and "
             "parameters against the single-task anchor, in %.", "",
             f"| method | {' | '.join(heads)} | Delta_m % | params % | params | tree |",
             f"| --- | {' | '.join('---' for _ in heads)} | --- | --- | --- | --- |"]
    for row in table["rows"]:
        tree = " / ".join(",".join(str(p) for p in layer) for layer in row["tree"]) if row["tree"] else "-"
        lines.append(f"| {row['method']} | {' | '.join(f'{v:.4g}' for v in row['metrics'])} | "
                     f"{_fmt(row['delta_m_percent'], '+.2f')} | {_fmt(row['params_change_percent'], '+.1f')} | "
                     f"{row['params']:,} | {tree} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a run of `dymu run` (its anchor is reused)")
    parser.add_argument("--methods", nargs="+", default=list(BASELINES), choices=BASELINES)
    parser.add_argument("--subsets", type=int, default=SUBSETS, help="random subsets per size in figure 6")
    parser.add_argument("--max_batches", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:<index> (default: cuda if available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override an entry of the run's pipeline config (e.g. a baseline's max_steps)")
    parser.add_argument("--baselines_from", default=None, metavar="P.yaml",
                        help="take the baseline sections the run's config lacks from this pipeline config")
    parser.add_argument("--architectures", action="store_true",
                        help="also the architecture evaluation (tables 5 and 7): train LTB, BMTAS, feature "
                             f"partitioning and the retrained trees ({', '.join(ARCHITECTURE_STAGES)}) and score them")
    args = parser.parse_args(argv)
    import torch

    from stages.evaluate import trainer_device
    from stages.lineage import run_lock

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    trainer_device(args.device, 1)  # a device this machine lacks fails before anything trains

    with run_lock(args.run_dir, "compare", create=False):
        result = compare_run(args.run_dir, methods=args.methods, overrides=args.overrides, subsets=args.subsets,
                             max_batches=args.max_batches, device=args.device, baselines_from=args.baselines_from,
                             architectures=args.architectures)
    print(render_report(result))
    print(f"[dymu compare] wrote {RunLayout(args.run_dir).compare_dir}")
    return 0
