"""The README's quickstart tables from several seeds' runs: mean ± standard deviation over the runs.

    python docs/scripts/seed_table.py runs/quickstart_s0 runs/quickstart_s1 runs/quickstart_s2

Reads each run's ``evaluation/metrics.json`` (``dymu evaluate``, as ``stages.results.EvaluationResult``: records
and cost entries found by their typed fields) and prints two Markdown tables: the pruned model's parameters as a
fraction of the anchor's (all, focused, near-uniform and the uniform preference, at c = 0 and 1, and their
ratio), and hypervolume over the anchor's and uniformity per method.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dymu.layout import RunLayout  # noqa: E402
from stages.results import CostGroup, EvaluationResult, Method  # noqa: E402


def mean_sd(values: list[float], digits: int = 3, low: bool = False) -> str:
    """``mean ± sd`` over the runs (``low``: and the lowest run's value)."""
    arr = np.asarray(values, dtype=float)
    sd = arr.std(ddof=1) if len(arr) > 1 else 0.0
    text = f"{arr.mean():.{digits}f} ± {sd:.{digits}f}"
    return f"{text} (min {arr.min():.{digits}f})" if low else text


def common_reference_ratios(metrics: EvaluationResult, reference: EvaluationResult
                            ) -> dict[tuple[Method, bool, float, float | None], float]:
    """Hypervolume of every record of ``metrics`` against ``reference``'s reference point, over ``reference``'s
    single-task anchor's at c = 0: two runs' results on one scale (e.g. against the paper's separately trained
    anchor of the same seed)."""
    from dymu.metrics import hypervolume

    ref = np.asarray(reference.reference_point, dtype=float)
    base = reference.record(Method.ANCHOR, c=0.0).hypervolume
    out = {}
    for rec in metrics.records + metrics.budget_records:
        points = np.asarray([p["losses"] for p in rec.preferences], dtype=float)
        out[(rec.method, rec.adaptation, rec.c, rec.budget)] = hypervolume(points, ref) / base
    return out


def cost_fractions(metrics: EvaluationResult, group: CostGroup) -> tuple[float, float] | None:
    """Mean parameters over the anchor's of the cost preferences of ``group`` at c = 0 and 1 (None when the
    group is empty)."""
    anchor = metrics.anchor["params"]
    found = []
    for c in (0.0, 1.0):
        summary = metrics.cost(group, c)
        if summary is None or not summary.count:
            return None
        found.append(summary.mean_params / anchor)
    return found[0], found[1]


def read_metrics(run: str) -> EvaluationResult:
    return EvaluationResult.read(RunLayout(run).metrics, f"rerun `dymu evaluate --run_dir {run}`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories with evaluation/metrics.json")
    parser.add_argument("--common_reference", nargs="+", default=[],
                        help="runs (one per seed, in the order of the first runs) whose reference point and anchor "
                             "set a common scale: e.g. the paper's separately trained anchor of the same seeds")
    args = parser.parse_args()
    runs = [read_metrics(r) for r in args.runs]

    n = len(runs[0].tasks)
    count = runs[0].cost(CostGroup.ALL, None).count
    print(f"| preferences ({count} r ~ Dirichlet(1)) | c = 0: params / anchor's | c = 1 | c=1 / c=0 |")
    print("| --- | --- | --- | --- |")
    for label, group in (("all", CostGroup.ALL), ("focused, max r >= 0.9", CostGroup.FOCUSED),
                         ("near-uniform, max r <= 1.5 / N", CostGroup.NEAR_UNIFORM)):
        pairs = [cost_fractions(m, group) for m in runs]
        pairs = [p for p in pairs if p is not None]
        if not pairs:
            print(f"| {label} | none among the cost preferences | | |")
            continue
        print(f"| {label} | {mean_sd([p[0] for p in pairs])} | {mean_sd([p[1] for p in pairs])} | "
              f"{mean_sd([p[1] / p[0] for p in pairs])} |")
    uniform = [m.uniform_controllability() for m in runs]
    u0 = [row["params"]["0.0"] / m.anchor["params"] for row, m in zip(uniform, runs)]
    u1 = [row["params"]["1.0"] / m.anchor["params"] for row, m in zip(uniform, runs)]
    uniform_r = ", ".join([f"1/{n}"] * n)
    print(f"| uniform r = ({uniform_r}) (per seed: {', '.join(f'{a:.2f} -> {b:.2f}' for a, b in zip(u0, u1))}) | "
          f"{mean_sd(u0)} | {mean_sd(u1)} | {mean_sd([b / a for a, b in zip(u0, u1)])} |")
    print()
    print("| 20 preferences r ~ Dirichlet(1) | HV / anchor's, c = 0 | c = 1 | uniformity c = 0 | c = 1 |")
    print("| --- | --- | --- | --- | --- |")
    names = {(Method.ANCHOR, False): "single-task anchor", (Method.DYMU, False): "DYMU without BN adaptation",
             (Method.DYMU, True): "DYMU with BN adaptation"}
    for method, adapt in names:
        cells = []
        for key in ("hypervolume_ratio", "uniformity"):
            for c in (0.0, 1.0):
                values = [getattr(m.record(method, adapt, c), key) for m in runs]
                cells.append(mean_sd(values, low=key == "hypervolume_ratio" and method is Method.DYMU))
        print(f"| {names[(method, adapt)]} | " + " | ".join(cells) + " |")
    budgets = sorted({r.budget for m in runs for r in m.budget_records}, reverse=True)
    if budgets:
        print()
        print("| budget B (c = 0) | HV / anchor's, no adaptation | with adaptation | mean params / anchor's | "
              "largest / anchor's | every tree within B |")
        print("| --- | --- | --- | --- | --- | --- |")
        for budget in budgets:
            recs = {a: [next(r for r in m.budget_records if r.budget == budget and r.adaptation == a)
                        for m in runs] for a in (False, True)}
            print(f"| {budget:g} | {mean_sd([r.hypervolume_ratio for r in recs[False]], low=True)} | "
                  f"{mean_sd([r.hypervolume_ratio for r in recs[True]], low=True)} | "
                  f"{mean_sd([r.mean_fraction for r in recs[False]])} | "
                  f"{max(r.max_fraction for r in recs[False]):.3f} | "
                  f"{'yes' if all(r.within_budget for a in recs for r in recs[a]) else 'NO'} |")
    if args.common_reference:
        references = [read_metrics(r) for r in args.common_reference]
        ratios = [common_reference_ratios(m, ref) for m, ref in zip(runs, references)]
        own = [common_reference_ratios(ref, ref) for ref in references]
        print()
        print(f"On a common scale: hypervolume over the reference runs' single-task anchor (their reference point), "
              f"{len(ratios)} seeds:")
        print()
        print("| method | c = 0 | c = 1 |" + "".join(f" B = {b:g} |" for b in budgets))
        print("| --- | --- | --- |" + " --- |" * len(budgets))
        print("| reference runs' single-task anchor | 1 | 1 |" + " |" * len(budgets))
        rows = [("reference runs' DYMU, no adaptation", own, False), ("reference runs' DYMU, adapted", own, True),
                ("these runs' single-task anchor", ratios, None), ("these runs' DYMU, no adaptation", ratios, False),
                ("these runs' DYMU, adapted", ratios, True)]
        for label, table, adapt in rows:
            method = Method.ANCHOR if adapt is None else Method.DYMU
            adapt = bool(adapt)
            cells = [mean_sd([t[(method, adapt, c, None)] for t in table]) for c in (0.0, 1.0)]
            cells += [mean_sd([t[(Method.DYMU, adapt, 0.0, b)] for t in table]) if method is Method.DYMU and
                      all((Method.DYMU, adapt, 0.0, b) in t for t in table) else "-" for b in budgets]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
