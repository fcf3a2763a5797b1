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

from dymu.anchor import AnchorNet
from dymu.baselines.bmtas import BmtasNet, routing_to_architecture
from dymu.tasks import task_losses
from stages.common import build_data
from stages.pipeline import load_pipeline_config

GROUP_A, WRONG = [0, 0, 0, 3, 3, 3], [0, 0, 3, 3, 3, 0]
TREES = {  # routing[l][t] for tasks a0 a1 a2 b0 b1 b2
    "all shared": [[0] * 6] * 4,
    "groups split at layer 2": [[0] * 6] * 2 + [GROUP_A] * 2,
    "wrong split at layer 2": [[0] * 6] * 2 + [WRONG] * 2,
    "groups split at layer 0": [GROUP_A] * 4,
    "wrong split at layer 0": [WRONG] * 4,
    "separate": [list(range(6))] * 4,
}


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


def fixed_trees(dm, make_backbone, steps: int, seeds: list[int]) -> None:
    print(f"fixed trees, {steps} steps from scratch, validation MSE (mean over seeds {seeds}):")
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
        print(f"  {name:24s} all {mean.mean():.4f}  group a {mean[:3].mean():.4f}  group b {mean[3:].mean():.4f}")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", nargs=2, default=["bent", "square"])
    parser.add_argument("--seed", type=int, default=1, help="the data's seed")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each fixed tree")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4],
                        help="Gumbel samples per batch in the gradient check (arch_samples)")
    parser.add_argument("--gradient_only", action="store_true", help="skip the fixed trees")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dm, make_backbone = setup(args)
    if not args.gradient_only:
        fixed_trees(dm, make_backbone, args.steps, args.seeds)
    gradient_signal(dm, make_backbone, warmup=200, batches=16, samples=args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
