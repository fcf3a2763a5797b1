"""docs/results.md's comparison table from several seeds' `dymu compare` runs: mean ± standard deviation.

    python docs/scripts/compare_table.py runs/qs_s0 runs/qs_s1 runs/qs_s2

Reads each run's ``compare/metrics.json`` and prints one Markdown row per method (hypervolume over the
single-task anchor's, uniformity, inference parameters, GFLOPs, control parameters, training time), then the
orderings the paper claims, checked seed by seed. Runs compared with ``--architectures`` also give the
architecture evaluation (the paper's tables 5 and 7): per-task metrics, Delta_m and parameter change against
single-task, mean ± standard deviation, and the paper's table-5 ordering checked seed by seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dymu.layout import RunLayout  # noqa: E402
from stages.compare import ours_reaches_static_first  # noqa: E402


def mean_sd(values: list[float | None], spec: str = ".3f") -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    arr = np.asarray(known, dtype=float)
    sd = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{format(arr.mean(), spec)} ± {format(sd, spec.replace('+', ''))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    results = [json.loads(RunLayout(r).compare_metrics.read_text()) for r in args.runs]
    rows = [{row["method"]: row for row in res["rows"]} for res in results]
    print("| method | HV / single-task | uniformity | inference params | GFLOPs | control params | training time (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in rows[0]:
        per = [r[method] for r in rows]
        control = per[0]["control_params"]
        print(f"| {method} | {mean_sd([p['hv_ratio'] for p in per])} | {mean_sd([p['uniformity'] for p in per])} | "
              f"{mean_sd([p['params'] for p in per], ',.0f')} | {mean_sd([p['gflops'] for p in per], '.4f')} | "
              f"{'-' if control is None else f'{control:,}'} | {mean_sd([p['train_seconds'] for p in per], '.0f')} |")
    print()

    def hv(r: dict, m: str) -> float:
        return r[m]["hypervolume"]

    checks = {
        "ours (adapted, c=0) above PHN-BN in hypervolume": [hv(r, "ours, c=0") > hv(r, "PHN-BN") for r in rows],
        "ours (adapted, c=0) above PHN-BN in uniformity": [r["ours, c=0"]["uniformity"] > r["PHN-BN"]["uniformity"]
                                                           for r in rows],
        "ours (adapted, c=0) above PHN in hypervolume": [hv(r, "ours, c=0") > hv(r, "PHN") for r in rows],
        "adaptation raises hypervolume at c=0": [hv(r, "ours, c=0") > hv(r, "ours w/o adaptation, c=0") for r in rows],
        "adaptation raises hypervolume at c=1": [hv(r, "ours, c=1") > hv(r, "ours w/o adaptation, c=1") for r in rows],
        "ours' mean params lower at c=1 than c=0": [r["ours, c=1"]["params"] < r["ours, c=0"]["params"] for r in rows],
    }
    for res in results:
        match = res.get("static_match") or {}
        checks.setdefault("ours reaches the static networks' hypervolume in less training time", []).append(
            bool(match) and ours_reaches_static_first(match) is True)
    print("| ordering | per seed | holds |")
    print("| --- | --- | --- |")
    for name, values in checks.items():
        print(f"| {name} | {', '.join('yes' if v else 'no' for v in values)} | {'yes' if all(values) else 'no'} |")
    print()
    print("| seed | static networks to reach ours' HV (c=0, adapted; - : all K stay below it) | "
          "their training time (s) | ours' (s) | all K static: HV, time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for run, res in zip(args.runs, results):
        m = res.get("static_match") or {}
        fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        print(f"| {run} | {fmt(m.get('static_k'), 'd')} | {fmt(m.get('static_seconds'), '.0f')} | "
              f"{fmt(m.get('ours_seconds'), '.0f')} | {fmt(m.get('all_static_hypervolume'), '.4g')}, "
              f"{fmt(m.get('all_static_seconds'), '.0f')} |")


    architectures = [res.get("architectures") for res in results]
    if all(architectures):
        print()
        architecture_table(architectures)


SIMILAR_PARAMS_PERCENT = 10.0
"""Two trees' parameter changes (in % of single-task) within this many points count as a similar size."""


def architecture_table(tables: list[dict]) -> None:
    """Tables 5 and 7 over seeds, and the table-5 ordering: ours (c = 0, from the anchor) at least as good as LTB
    (from the anchor) in Delta_m where their parameter changes are similar."""
    first = tables[0]
    arrows = ["↑" if h else "↓" for h in first["higher_is_better"]]
    heads = [f"{t} {m} {a}" for t, m, a in zip(first["tasks"], first["metric_names"], arrows)]
    print(f"| method | {' | '.join(heads)} | Delta_m % | params % |")
    print(f"| --- | {' | '.join('---' for _ in heads)} | --- | --- |")
    rows = [{row["method"]: row for row in table["rows"]} for table in tables]
    for method in rows[0]:
        per = [r[method] for r in rows if method in r]
        metrics = [mean_sd([p["metrics"][i] for p in per], ".3f") for i in range(len(heads))]
        print(f"| {method} | {' | '.join(metrics)} | {mean_sd([p['delta_m_percent'] for p in per], '+.2f')} | "
              f"{mean_sd([p['params_change_percent'] for p in per], '+.1f')} |")
    print()
    print("| seed | ours, c=0: Delta_m %, params % | LTB: Delta_m %, params % | similar size | ours at least as good |")
    print("| --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        ours, ltb = r.get("ours, c=0"), r.get("LTB")
        if ours is None or ltb is None:
            continue
        similar = abs(ours["params_change_percent"] - ltb["params_change_percent"]) <= SIMILAR_PARAMS_PERCENT
        print(f"| {i} | {ours['delta_m_percent']:+.2f}, {ours['params_change_percent']:+.1f} | "
              f"{ltb['delta_m_percent']:+.2f}, {ltb['params_change_percent']:+.1f} | {'yes' if similar else 'no'} | "
              f"{'yes' if ours['delta_m_percent'] >= ltb['delta_m_percent'] else 'no'} |")


if __name__ == "__main__":
    main()
