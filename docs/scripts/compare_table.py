"""docs/results.md's comparison table from several seeds' `dymu compare` runs: mean ± standard deviation.

    python docs/scripts/compare_table.py runs/qs_s0 runs/qs_s1 runs/qs_s2

Reads each run's ``compare/metrics.json`` and prints one Markdown row per method (hypervolume over the
single-task anchor's, uniformity, inference parameters, GFLOPs, control parameters, training time), then the
orderings the paper claims, checked seed by seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.layout import RunLayout  # noqa: E402


def mean_sd(values: list[float | None], spec: str = ".3f") -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    arr = np.asarray(known, dtype=float)
    sd = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{format(arr.mean(), spec)} ± {format(sd, spec)}"


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
        # the static networks' time to ours' hypervolume; when all K stay below it, ours is compared with all K
        if match.get("static_k") is not None:
            static_seconds = match.get("static_seconds")
        elif match.get("all_static_hypervolume") is not None and match.get("ours_hypervolume") is not None \
                and match["all_static_hypervolume"] < match["ours_hypervolume"]:
            static_seconds = match.get("all_static_seconds")
        else:
            static_seconds = None
        checks.setdefault("ours reaches the static networks' hypervolume in less training time", []).append(
            static_seconds is not None and match.get("ours_seconds") is not None
            and match["ours_seconds"] < static_seconds)
    print("| ordering | per seed | holds |")
    print("| --- | --- | --- |")
    for name, values in checks.items():
        print(f"| {name} | {', '.join('yes' if v else 'no' for v in values)} | {'yes' if all(values) else 'no'} |")
    print()
    print("| seed | static networks to reach ours' HV (c=0, adapted; - : all K stay below it) | their training time (s) | ours' (s) | "
          "all K static: HV, time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for run, res in zip(args.runs, results):
        m = res.get("static_match") or {}
        fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        print(f"| {run} | {fmt(m.get('static_k'), 'd')} | {fmt(m.get('static_seconds'), '.0f')} | "
              f"{fmt(m.get('ours_seconds'), '.0f')} | {fmt(m.get('all_static_hypervolume'), '.4g')}, "
              f"{fmt(m.get('all_static_seconds'), '.0f')} |")


if __name__ == "__main__":
    main()
