"""The RSA task affinity of a finished anchor, computed once and saved in the run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule

from dymu.affinity import rsa_affinity, save_affinity
from dymu.model import DynamicMultiTaskModel


@torch.no_grad()
def compute_affinity(anchor_checkpoint: str | Path, data: LightningDataModule, out_dir: str | Path,
                     num_images: int = 100, seed: int = 0) -> torch.Tensor:
    """Run the anchor as N separate networks on ``num_images`` training inputs (chosen with ``seed``),
    compute the affinity and write ``affinity.json`` and ``affinity.png`` into ``out_dir``."""
    model = DynamicMultiTaskModel.from_checkpoint(anchor_checkpoint)
    data.setup("fit")
    images = data.sample_inputs(num_images, seed=seed)
    affinity = rsa_affinity(model.anchor.stream_features(images))
    out_dir = Path(out_dir)
    save_affinity(affinity, model.tasks, out_dir / "affinity.json", out_dir / "affinity.png")
    return affinity


def main(argv: list[str] | None = None) -> int:
    """``dymu affinity``: the affinity of an anchor checkpoint, on the data of a pipeline or stage config."""
    from stages.common import build_data, read_yaml

    parser = argparse.ArgumentParser(prog="dymu affinity", description=compute_affinity.__doc__)
    parser.add_argument("--config", required=True, help="a pipeline or stage config with a data section")
    parser.add_argument("--anchor_checkpoint", required=True, help="the anchor stage's final.ckpt")
    parser.add_argument("--out_dir", required=True, help="where affinity.json and affinity.png go")
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = build_data(read_yaml(args.config)["data"])
    affinity = compute_affinity(args.anchor_checkpoint, data, args.out_dir, args.num_images, args.seed)
    print(affinity.numpy().round(3))
    return 0
