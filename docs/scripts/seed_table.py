"""The README's quickstart tables from several seeds' runs: mean ± standard deviation over the runs.

    python docs/scripts/seed_table.py runs/quickstart_s0 runs/quickstart_s1 runs/quickstart_s2

Reads each run's ``evaluation/metrics.json`` (``dymu evaluate``) and prints two Markdown tables: the pruned
model's parameters as a fraction of the anchor's (all, focused, near-uniform and the uniform preference, at
c = 0 and 1, and their ratio), and hypervolume over the anchor's and uniformity per method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.layout import RunLayout  # noqa: E402


def mean_sd(values: list[float], digits: int = 3) -> str:
    arr = np.asarray(values, dtype=float)
    sd = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{arr.mean():.{digits}f} ± {sd:.{digits}f}"


def cost_fractions(metrics: dict, prefix: str) -> tuple[float, float] | None:
    anchor = metrics["anchor"]["params"]
    costs = metrics["inference_cost"]
    found = []
    for c in ("0", "1"):
        name = next((k for k in costs if (k == f"c={c}" if not prefix else k.startswith(prefix) and
                                           k.endswith(f", c={c}"))), None)
        if name is None or costs[name] is None:
            return None
        found.append(costs[name]["mean_params"] / anchor)
    return found[0], found[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories with evaluation/metrics.json")
    args = parser.parse_args()
    runs = [json.loads(RunLayout(r).metrics.read_text()) for r in args.runs]

    print("| preferences (1000 r ~ Dirichlet(1)) | c = 0: params / anchor's | c = 1 | c=1 / c=0 |")
    print("| --- | --- | --- | --- |")
    for label, prefix in (("all", ""), ("focused, max r >= 0.9", "focused"), ("near-uniform, max r <= 0.5",
                                                                             "near-uniform")):
        pairs = [cost_fractions(m, prefix) for m in runs]
        pairs = [p for p in pairs if p is not None]
        print(f"| {label} | {mean_sd([p[0] for p in pairs])} | {mean_sd([p[1] for p in pairs])} | "
              f"{mean_sd([p[1] / p[0] for p in pairs])} |")
    uniform = [next(row for row in m["controllability"] if row["preference"] == "uniform") for m in runs]
    u0 = [row["params"]["0.0"] / m["anchor"]["params"] for row, m in zip(uniform, runs)]
    u1 = [row["params"]["1.0"] / m["anchor"]["params"] for row, m in zip(uniform, runs)]
    print(f"| uniform r = (1/3, 1/3, 1/3) (per seed: {', '.join(f'{a:.2f} -> {b:.2f}' for a, b in zip(u0, u1))}) | "
          f"{mean_sd(u0)} | {mean_sd(u1)} | {mean_sd([b / a for a, b in zip(u0, u1)])} |")
    print()
    print("| 20 preferences r ~ Dirichlet(1) | HV / anchor's, c = 0 | c = 1 | uniformity c = 0 | c = 1 |")
    print("| --- | --- | --- | --- | --- |")
    methods = [("single-task anchor", False), ("dymu", False), ("dymu", True)]
    names = {("single-task anchor", False): "single-task anchor", ("dymu", False): "DYMU without BN adaptation",
             ("dymu", True): "DYMU with BN adaptation"}
    for method, adapt in methods:
        cells = []
        for key in ("hypervolume_ratio", "uniformity"):
            for c in (0.0, 1.0):
                values = [next(r[key] for r in m["records"] if r["method"] == method and r["adaptation"] == adapt
                               and r["c"] == c) for m in runs]
                cells.append(mean_sd(values))
        print(f"| {names[(method, adapt)]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
