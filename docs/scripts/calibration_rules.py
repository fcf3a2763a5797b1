"""What the controller's calibration rule changes: the cost of the trees at c = 0 and 1 under three rules.

    python docs/scripts/calibration_rules.py runs/qs_t2_s0 [runs/qs_t2_s1 ...]

For each run (a measured controller), lambda is set by each rule and the mean parameters over the anchor's are
printed for 300 preferences r ~ Dirichlet(1) (all, focused max r >= 0.9, near-uniform max r <= 0.5) and the
uniform preference, at c = 0 and c = 1. Rules: the median sharing step of the 32 calibration preferences at
c = 0.5; the median step of the uniform preference at c = 0.5; the uniform preference's last step at c = 0.9
(``calibrate_trade_off``, the quickstart's) and at c = 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dymu.controller import CostModel, calibration_preferences, candidate_trees, lagrangian_path  # noqa: E402
from dymu.model import DynamicMultiTaskModel  # noqa: E402
from dymu.preference import cost_preferences  # noqa: E402
from dymu.search_space import Architecture  # noqa: E402


def sharing_steps(ctrl, costs, r: torch.Tensor) -> list[float]:  # noqa: ANN001
    """The prices ``mu`` at which preference ``r``'s Lagrangian path steps to a cheaper tree."""
    cost_model = CostModel.create(costs, ctrl.cost_metric)
    scaled, n = ctrl.scaled_losses(), ctrl.n_tasks

    def loss(trees):  # noqa: ANN001, ANN202
        return (scaled[trees.paths, torch.arange(n)] * r).sum(dim=1)

    trees = candidate_trees(loss, cost_model, n, ctrl.n_layers, ctrl.search)
    return lagrangian_path(loss(trees), cost_model(trees))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    print("| run | rule | lambda | params c=0 -> c=1 | focused c=0 / 1 | near-uniform c=0 / 1 | uniform r c=0 -> 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        model = DynamicMultiTaskModel.from_run(run)
        ctrl = model.controller
        if ctrl is None:
            raise SystemExit(f"{run} has no measured controller")
        costs = model.node_costs()
        n, n_layers = ctrl.n_tasks, ctrl.n_layers
        prefs = calibration_preferences(n)
        uniform = sharing_steps(ctrl, costs, prefs[0])
        every = [mu for r in prefs for mu in sharing_steps(ctrl, costs, r)]
        g = ctrl.base_frugality
        rules = [("median of 32 at 0.5", float(np.quantile(every, 0.5)) / (g + (1 - g) * 0.5)),
                 ("uniform's median at 0.5", float(np.quantile(uniform, 0.5)) / (g + (1 - g) * 0.5) if uniform else None),
                 ("uniform's last at 0.9", uniform[-1] / (g + (1 - g) * 0.9) if uniform else None),
                 ("uniform's last at 1", uniform[-1] if uniform else None)]
        sample = cost_preferences(n, 300, seed=0)
        top = np.array([max(p.r) for p in sample])
        anchor = costs.cost(Architecture.anchor(n, n_layers))["params"]
        saved = float(ctrl.trade_off)
        for name, lam in rules:
            if lam is None:
                print(f"| {run} | {name} | - | the uniform preference has no sharing step | | | |")
                continue
            ctrl.trade_off.fill_(lam)
            cells = []
            for c in (0.0, 1.0):
                frac = np.array([costs.cost(model.architecture(p.r, c))["params"] / anchor for p in sample])
                uni = costs.cost(model.architecture([1 / n] * n, c))["params"] / anchor
                cells.append((frac.mean(), frac[top >= 0.9].mean(), frac[top <= 0.5].mean(), uni))
            (a0, f0, n0, u0), (a1, f1, n1, u1) = cells
            print(f"| {run} | {name} | {lam:.3g} | {a0:.3f} -> {a1:.3f} | {f0:.3f} / {f1:.3f} | {n0:.3f} / {n1:.3f} | "
                  f"{u0:.2f} -> {u1:.2f} |")
        ctrl.trade_off.fill_(saved)


if __name__ == "__main__":
    main()
