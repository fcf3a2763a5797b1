"""How related Learning to Branch's regression tasks are under each reading of the paper's data: the mean
target correlation within each activation's group and between groups, for the three settings of its figure 3.

    python docs/scripts/regression_correlations.py [--input_dim 200 --output_dim 100 --tasks_per_group 5]

Readings: ``noise_scale`` (the paper's ``B ~ N(0, 10)``, ``delta ~ N(0, 2)`` as variances or as standard
deviations), ``phi`` (``sqrt(3 input_dim)``, this data module's default, or ``input_dim``, the paper's words) and
``input_distribution`` (normal or uniform ``Z``). Prints one Markdown table per setting: a row per reading, a
column per group ("within") and per pair of groups ("between"); docs/results.md holds the output.
"""

from __future__ import annotations

import argparse
import itertools

from datamodules.datasets.synthetic import RegressionTasks

SETTINGS = {
    "(a) bent, square, sinc": {"activations": ["bent", "square", "sinc"]},
    "(b) sin x 1, 2, 3": {"activations": ["sin", "sin", "sin"], "scale_multipliers": [1.0, 2.0, 3.0]},
    "(c) cos, sinc, square": {"activations": ["cos", "sinc", "square"]},
}
READINGS = list(itertools.product(("variance", "std"), ("sqrt3", "input_dim"), ("normal", "uniform")))


def table(setting: dict, args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    for noise, phi, dist in READINGS:
        tasks = RegressionTasks(setting["activations"], args.tasks_per_group, args.input_dim, args.output_dim,
                                num_train=1000, seed=args.seed, scale_multipliers=setting.get("scale_multipliers"),
                                phi=None if phi == "sqrt3" else phi, noise_scale=noise, input_distribution=dist)
        summary = tasks.correlation_summary(args.samples)
        if not lines:
            lines = ["| noise_scale | phi | Z | " + " | ".join(summary) + " |",
                     "| --- | --- | --- | " + " | ".join("---" for _ in summary) + " |"]
        phi_text = f"sqrt(3 d) = {tasks.phi:.1f}" if phi == "sqrt3" else f"d = {tasks.phi:g}"
        lines.append(f"| {noise} | {phi_text} | {dist} | " + " | ".join(f"{v:.2f}" for v in summary.values()) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dim", type=int, default=200)
    parser.add_argument("--output_dim", type=int, default=100)
    parser.add_argument("--tasks_per_group", type=int, default=5)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, setting in SETTINGS.items():
        print(f"\nSetting {name}: {args.tasks_per_group} tasks per group, Z in R^{args.input_dim}, "
              f"T in R^{args.output_dim}, {args.samples} samples, seed {args.seed}\n")
        print("\n".join(table(setting, args)))


if __name__ == "__main__":
    main()
