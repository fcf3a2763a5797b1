"""The local search's optimality gap against enumeration, on a run's measured controller.

    python docs/scripts/local_search_gap.py runs/quickstart [--preferences 200]

For preferences r ~ Dirichlet(1) (fixed seed), c in {0, 0.25, 0.5, 0.75, 1} and each budget of --budgets, solves
the controller's objective exactly (every tree) and by ``local_search`` (what spaces too large to enumerate use)
and prints how often the local search finds the optimum, and its mean and largest relative excess objective.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dymu.controller import CostModel, Trees, as_parents, check_budget, minimize_tree  # noqa: E402
from dymu.model import DynamicMultiTaskModel  # noqa: E402
from dymu.preference import cost_preferences  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--preferences", type=int, default=200)
    parser.add_argument("--budgets", default="none,0.8,0.6")
    args = parser.parse_args()
    model = DynamicMultiTaskModel.from_run(args.run_dir)
    ctrl = model.controller
    if ctrl is None:
        raise SystemExit(f"{args.run_dir} has no measured controller")
    costs = CostModel.create(model.node_costs(), ctrl.cost_metric)
    n, n_layers = ctrl.n_tasks, ctrl.n_layers
    prefs = cost_preferences(n, args.preferences, seed=0)
    print("| budget | cases | local search at the optimum | mean excess | largest excess |")
    print("| --- | --- | --- | --- | --- |")
    for text in args.budgets.split(","):
        budget = None if text == "none" else check_budget(float(text), costs)
        excess = []
        for pref in prefs:
            r = torch.tensor(pref.r, dtype=torch.float64)
            task = ctrl.task_objective(r)
            for c in (0.0, 0.25, 0.5, 0.75, 1.0):
                mu = ctrl.frugality(c)

                def objective(trees: Trees, task=task, mu=mu) -> torch.Tensor:
                    return task(trees) + mu * costs(trees)

                values = [float(objective(Trees(as_parents(
                    minimize_tree(objective, costs, n, n_layers, budget, method)).unsqueeze(0)))[0])
                    for method in ("exact", "local")]
                excess.append((values[1] - values[0]) / abs(values[0]))
        arr = np.asarray(excess)
        print(f"| {text} | {len(arr)} | {np.mean(arr <= 1e-6):.1%} | {arr.mean():.2e} | {arr.max():.2e} |")


if __name__ == "__main__":
    main()
