"""Two checks behind docs/results.md's "BMTAS on a held-out grouping": is the grouping identifiable by the task
loss (fixed trees trained from scratch), and how strong is the task loss's gradient on BMTAS's routing logits
after the warm-up (its mean over batches against its spread)?

    python docs/scripts/bmtas_heldout_checks.py --activations bent square --seed 1
    python docs/scripts/bmtas_heldout_checks.py --activations sin square --seed 1

Data: ``configs/synthetic_regression.yaml`` with two activations, three tasks each, data seed ``--seed``.
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch
from torch.utils.data import DataLoader

from dymu.anchor import AnchorNet, batch_statistics
from dymu.baselines.bmtas import BmtasNet, groupings, routing_to_architecture
from dymu.tasks import task_losses
from stages.common import build_data
from stages.pipeline import load_pipeline_config

GROUP_A, WRONG = [0, 0, 0, 3, 3, 3], [0, 0, 3, 3, 3, 0]
TREES = {  # routing[l][t] for tasks a0 a1 a2 b0 b1 b2
    "all shared": [[0] * 6] * 4,
    "groups split at layer 3": [[0] * 6] * 3 + [GROUP_A],
    "groups split at layer 2": [[0] * 6] * 2 + [GROUP_A] * 2,
    "groups split at layer 1": [[0] * 6] + [GROUP_A] * 3,
    "wrong split at layer 2": [[0] * 6] * 2 + [WRONG] * 2,
    "groups split at layer 0": [GROUP_A] * 4,
    "wrong split at layer 0": [WRONG] * 4,
    "a0 apart at layer 1, groups at 2": [[0] * 6, [0, 1, 1, 1, 1, 1], [0, 1, 1, 3, 3, 3], [0, 1, 1, 3, 3, 3]],
    "group a apart at layer 2": [[0] * 6] * 2 + [[0, 1, 2, 3, 3, 3]] * 2,
    "group b apart at layer 2": [[0] * 6] * 2 + [[0, 0, 0, 3, 4, 5]] * 2,
    "separate": [list(range(6))] * 4,
}


def node_fraction(routing: list[list[int]]) -> float:
    """The tree's encoder nodes over those of N separate encoders: BMTAS's resource loss at this routing when every
    layer costs the same (``BmtasNet.found_resource_loss`` weights the layers by their measured cost)."""
    return sum(len(g) for g in groupings(routing)) / (len(routing) * len(routing[0]))


def setup(args: argparse.Namespace):
    overrides = [f"data.init_args.activations={json.dumps(args.activations)}", "data.init_args.tasks_per_group=3",
                 f"data.init_args.seed={args.seed}"]
    cfg = load_pipeline_config("configs/synthetic_regression.yaml", overrides)
    dm = build_data(cfg.data)
    dm.setup("fit")
    module, name = cfg.backbone["class_path"].rsplit(".", 1)
    return dm, lambda: getattr(importlib.import_module(module), name)(**dict(cfg.backbone["init_args"]))


def train(net, dm, steps: int, forward) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    step = 0
    while step < steps:
        for batch in dm.train_dataloader():
            loss = task_losses(dm.tasks, forward(batch["image"]), batch).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step >= steps:
                return


def fixed_trees(dm, make_backbone, steps: int, seeds: list[int], weights: list[float]) -> None:
    """Each tree of ``TREES`` trained from scratch: its validation MSE, and BMTAS's objective (mean task loss +
    lambda * resource loss) at each lambda of ``weights``; the tree that minimises it is marked."""
    print(f"fixed trees, {steps} steps from scratch, validation MSE (mean over seeds {seeds}):")
    results = {}
    for name, routing in TREES.items():
        losses = []
        for seed in seeds:
            torch.manual_seed(seed)
            net, tree = AnchorNet(make_backbone(), dm.tasks), routing_to_architecture(routing)
            train(net, dm, steps, lambda x, n=net, a=tree: n(x, architecture=a))
            net.eval()
            with torch.no_grad():
                losses.append(torch.stack([task_losses(dm.tasks, net(b["image"], architecture=tree), b)
                                           for b in dm.val_dataloader()]).mean(0))
        mean = torch.stack(losses).mean(0)
        results[name] = (float(mean.mean()), node_fraction(routing))
        print(f"  {name:34s} all {mean.mean():.4f}  group a {mean[:3].mean():.4f}  group b {mean[3:].mean():.4f}  "
              f"resource {results[name][1]:.3f}")
    print("BMTAS's objective, mean task loss + lambda * resource (* the smallest):")
    print("  " + " ".join(f"{'lambda ' + format(w, 'g'):>12s}" for w in weights) + "  tree")
    best = {w: min(results, key=lambda n, w=w: results[n][0] + w * results[n][1]) for w in weights}
    for name, (loss, resource) in results.items():
        cells = [f"{loss + w * resource:.4f}{'*' if best[w] == name else ' '}" for w in weights]
        print("  " + " ".join(f"{c:>12s}" for c in cells) + f"  {name}")


def gradient_signal(dm, make_backbone, warmup: int, batches: int, samples: list[int]) -> None:
    """The task loss's gradient on the routing logits after the warm-up, per batch, with its loss averaged over
    ``k`` Gumbel samples (``BmtasSearch(arch_samples=k)``): mean over batches against the spread."""
    torch.manual_seed(0)
    net = BmtasNet(make_backbone(), dm.tasks, input_shape=dm.input_shape)
    train(net.anchor, dm, warmup, net.anchor)  # the warm-up: every stream on its own task
    for temperature in (5.0, 1.0):
        for k in samples:
            torch.manual_seed(1)
            grads = []
            for i, batch in enumerate(dm.train_dataloader()):
                loss = torch.stack([task_losses(dm.tasks, net.search_forward(batch["image"], temperature), batch).mean()
                                    for _ in range(k)]).mean()
                grads.append(torch.autograd.grad(loss, [net.logits])[0])
                if i + 1 >= batches:
                    break
            g = torch.stack(grads)
            print(f"temperature {temperature:g}, {k} Gumbel sample(s) per batch: task-loss gradient on the logits, "
                  f"mean abs {g.mean(0).abs().mean():.1e}, per-batch signal-to-noise |mean| / sd "
                  f"{(g.mean(0).abs() / g.std(0)).mean():.2f}")


def single_moves(dm, checkpoint: str) -> None:
    """On a searched supergraph (a BMTAS checkpoint), every task's validation loss through its found routing
    against the best routing that moves that task alone to another candidate in one layer (the supergraph's
    weights, BatchNorms on batch statistics over the whole validation set)."""
    net = BmtasNet.from_checkpoint(checkpoint)
    val = next(iter(DataLoader(dm.val_dataloader().dataset, batch_size=len(dm.val_dataloader().dataset))))
    routing = net.routing()
    n_layers, n = len(routing), len(routing[0])

    def task_loss(rows: list[list[int]], task: int) -> float:
        weights = torch.zeros(n_layers, n)
        weights[torch.arange(n_layers), [rows[layer][task] for layer in range(n_layers)]] = 1
        with torch.no_grad(), batch_statistics(net.anchor):
            outputs = {net.task_names[task]: net.task_forward(val["image"], task, weights)}
        return float(task_losses([dm.tasks[task]], outputs, val)[0])

    print(f"{checkpoint}: routing {routing}")
    for task in range(n):
        own = task_loss(routing, task)
        moves = [(task_loss([[s if (layer, t) == (k, task) else c for t, c in enumerate(row)]
                             for k, row in enumerate(routing)], task), layer, s)
                 for layer in range(n_layers) for s in range(n) if s != routing[layer][task]]
        best = min(moves)
        print(f"  task {task} ({net.task_names[task]}): found {own:.4f}, best single move {best[0]:.4f} "
              f"(layer {best[1]} -> candidate {best[2]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", nargs=2, default=["bent", "square"])
    parser.add_argument("--seed", type=int, default=1, help="the data's seed")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each fixed tree")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4],
                        help="Gumbel samples per batch in the gradient check (arch_samples)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5],
                        help="resource weights (lambda) at which to evaluate BMTAS's objective on the fixed trees")
    parser.add_argument("--checkpoint", default=None,
                        help="a BMTAS search's final.ckpt on this data: only the single-move check on it")
    parser.add_argument("--gradient_only", action="store_true", help="skip the fixed trees")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dm, make_backbone = setup(args)
    if args.checkpoint is not None:
        single_moves(dm, args.checkpoint)
        return 0
    if not args.gradient_only:
        fixed_trees(dm, make_backbone, args.steps, args.seeds, args.weights)
    gradient_signal(dm, make_backbone, warmup=200, batches=16, samples=args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
