"""Diagnostic behind docs/controllability.md: train edge logits on a frozen anchor outside the pipeline and
print the trees they pick over c, for a few preferences.

Two learners with the edge stage's own objective (``dymu.training.edge_search_loss``, 8 preferences per step,
loss scales ``1 / L_t(anchor)`` on the validation set, the temperature schedule tied to the budget):

- ``--learner free``: free logits for one fixed preference (``--r``, ``--c``): what the objective asks for;
- ``--learner hypernet``: a fresh edge hypernet over training preferences (``--train_r uniform``: r = 1/N with
  c ~ U(0, 1); ``--train_r dirichlet``: r ~ Dirichlet(eta), c ~ U(0, 1)): what the amortised learner finds.

    python docs/scripts/edge_probe.py --run_dir runs/quickstart --learner free --r 0.3334,0.3333,0.3333 --c 0
    python docs/scripts/edge_probe.py --run_dir runs/quickstart --learner hypernet --train_r uniform \\
        --lambda_active 1.0 --lambda_inactive 0.1

Round 12's options (docs/controllability.md): ``--c_conditioning affine`` (logits ``a(r) + c b(r)``),
``--logit_bound B`` (``B tanh(logits / B)``), ``--c_sampling paired|stratified`` (the step's preferences get
``c`` and ``1 - c`` in pairs, or ``c`` stratified over [0, 1]).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dymu.affinity import load_affinity
from dymu.evaluation import mean_task_losses
from dymu.hypernets import EdgeHypernet
from dymu.layout import RunLayout
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference, sample_training_preference
from dymu.search_space import Architecture
from dymu.tasks import tasks_from_config
from dymu.training import edge_search_loss, temperature_at
from stages.common import build_data, read_yaml

PROBES = [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.0, 0.5], [0.45, 0.1, 0.45], [0.4, 0.3, 0.3], [0.5, 0.5, 0.0]]


class FreeLogits(nn.Module):
    """Edge logits as free parameters (one preference), answering any ``(r, c)`` with the same logits."""

    def __init__(self, n_layers: int, n_tasks: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_layers, n_tasks, n_tasks))

    def forward(self, r: Tensor, c: Tensor) -> Tensor:
        return self.logits.expand(*r.shape[:-1], *self.logits.shape)


class BoundedLogits(nn.Module):
    """``bound * tanh(logits / bound)``: logits that cannot saturate beyond ``bound`` (``--logit_bound``)."""

    def __init__(self, inner: nn.Module, bound: float) -> None:
        super().__init__()
        self.inner, self.bound = inner, bound

    def forward(self, r: Tensor, c: Tensor) -> Tensor:
        return self.bound * torch.tanh(self.inner(r, c) / self.bound)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a run with anchor/final.ckpt and affinity.json")
    parser.add_argument("--learner", choices=["free", "hypernet"], required=True)
    parser.add_argument("--r", default="0.3334,0.3333,0.3333", help="free: the preference")
    parser.add_argument("--c", type=float, default=0.0, help="free: the cost preference")
    parser.add_argument("--train_r", choices=["uniform", "dirichlet"], default="dirichlet")
    parser.add_argument("--eta", type=float, default=0.2)
    parser.add_argument("--lambda_active", type=float, default=1.0)
    parser.add_argument("--lambda_inactive", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=0.2)
    parser.add_argument("--layer_weighting", choices=["paper", "all", "none"], default="paper")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 0.05 free, 5e-3 hypernet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--c_sampling", choices=["uniform", "paired", "stratified"], default="uniform")
    parser.add_argument("--logit_bound", type=float, default=None)
    parser.add_argument("--c_conditioning", choices=["embedding", "affine"], default="embedding")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    run = Path(args.run_dir)
    layout = RunLayout(run)
    model = DynamicMultiTaskModel.from_checkpoint(layout.final("anchor")).eval().requires_grad_(False)
    anchor, n, n_layers = model.anchor, model.n_tasks, model.anchor.n_layers
    data_config = read_yaml(layout.pipeline_config)["data"]
    data_config["init_args"]["batch_size"] = args.groups
    data = build_data(data_config)
    data.setup("fit")
    tasks = tasks_from_config(anchor.task_configs)
    scales = 1.0 / mean_task_losses(lambda x: anchor(x), list(data.val_dataloader()), tasks)
    affinity = load_affinity(layout.affinity, model.tasks).float()
    regularizer = {"tau": args.tau, "lambda_active": args.lambda_active, "lambda_inactive": args.lambda_inactive,
                   "layer_weighting": args.layer_weighting}
    learner: nn.Module = (FreeLogits(n_layers, n) if args.learner == "free"
                          else EdgeHypernet(n, n_layers, c_conditioning=args.c_conditioning))
    if args.logit_bound is not None:
        learner = BoundedLogits(learner, args.logit_bound)
    lr = args.lr if args.lr is not None else (0.05 if args.learner == "free" else 5e-3)
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr)
    rng = np.random.default_rng(args.seed)
    fixed = Preference.create([float(v) for v in args.r.split(",")], args.c, normalize=True)

    def preferences() -> list[Preference]:
        if args.learner == "free":
            return [fixed] * args.groups
        if args.train_r == "uniform":
            prefs = [Preference.uniform(n, float(rng.uniform())) for _ in range(args.groups)]
        else:
            prefs = [sample_training_preference(n, rng, eta=args.eta) for _ in range(args.groups)]
        if args.c_sampling == "paired":
            prefs = [Preference.create(prefs[g - g % 2].r, prefs[g - g % 2].c if g % 2 == 0 else 1 - prefs[g - 1].c)
                     for g in range(args.groups)]
        elif args.c_sampling == "stratified":
            cs = (rng.permutation(args.groups) + rng.uniform()) / args.groups
            prefs = [Preference.create(p.r, float(c)) for p, c in zip(prefs, cs)]
        return prefs

    batches = iter([])
    for step in range(args.steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(data.train_dataloader())
            batch = next(batches)
        out = edge_search_loss(anchor, learner, tasks, scales, batch, preferences(),
                               temperature_at(step, args.steps), affinity, regularizer)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()

    costs = model.node_costs()
    full = costs.cost(Architecture.anchor(n, n_layers))["params"]
    report = []
    with torch.no_grad():
        probes = [fixed.r] if args.learner == "free" else PROBES
        for r in probes:
            row = {"r": [round(v, 3) for v in r], "params_fraction": {}, "tree": {}}
            for c in ([args.c] if args.learner == "free" else [0.0, 0.25, 0.5, 0.75, 1.0]):
                tree = Architecture.from_logits(learner(torch.tensor(r, dtype=torch.float32), torch.tensor(c)))
                row["params_fraction"][c] = round(costs.cost(tree)["params"] / full, 3)
                row["tree"][c] = str(tree)
            report.append(row)
    print(json.dumps({"args": vars(args), "probes": report}, indent=1))


if __name__ == "__main__":
    main()
