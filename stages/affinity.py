"""The RSA task affinity of a finished anchor, computed once and saved in the run directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dymu.layout import AFFINITY, AFFINITY_PLOT, RunLayout

if TYPE_CHECKING:  # torch and the model are imported where used: `dymu affinity --help` is fast
    import torch
    from lightning.pytorch import LightningDataModule

    from stages.pipeline import PipelineConfig


def compute_affinity(anchor_checkpoint: str | Path, data: LightningDataModule, out_dir: str | Path,
                     num_images: int = 100, seed: int = 0) -> torch.Tensor:
    """Run the anchor as N separate networks on ``num_images`` training inputs (chosen with ``seed``),
    compute the affinity and write it (and its plot) into ``out_dir`` (see ``dymu.layout``)."""
    import torch

    from dymu.affinity import rsa_affinity, save_affinity
    from dymu.model import DynamicMultiTaskModel

    model = DynamicMultiTaskModel.from_checkpoint(anchor_checkpoint)
    data.setup("fit")
    images = data.sample_inputs(num_images, seed=seed)
    with torch.no_grad():
        affinity = rsa_affinity(model.anchor.stream_features(images))
    out_dir = Path(out_dir)
    save_affinity(affinity, model.tasks, out_dir / AFFINITY, out_dir / AFFINITY_PLOT)
    return affinity


def affinity_step(config: PipelineConfig, layout: RunLayout) -> torch.Tensor:
    """The stage table's affinity step: the anchor of ``layout`` on the pipeline's data, with the pipeline's
    ``affinity`` section (``num_images``, ``seed``)."""
    from stages.common import build_data

    print("[dymu run] affinity: computing RSA task affinity from the anchor")
    affinity = compute_affinity(layout.final("anchor"), build_data(config.data), layout.root,
                                num_images=config.affinity.num_images, seed=config.affinity.seed)
    print(f"[dymu run] affinity:\n{affinity.numpy().round(3)}")
    return affinity


def main(argv: list[str] | None = None) -> int:
    """``dymu affinity``: the affinity of an anchor checkpoint, on the data of a pipeline or stage config."""
    from stages.common import build_data, read_yaml

    parser = argparse.ArgumentParser(prog="dymu affinity", description=compute_affinity.__doc__)
    parser.add_argument("--config", required=True, help="a pipeline or stage config with a data section")
    parser.add_argument("--anchor_checkpoint", required=True, help="the anchor stage's final.ckpt")
    parser.add_argument("--out_dir", required=True, help=f"where {AFFINITY} and {AFFINITY_PLOT} go")
    parser.add_argument("--num_images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = build_data(read_yaml(args.config)["data"])
    affinity = compute_affinity(args.anchor_checkpoint, data, args.out_dir, args.num_images, args.seed)
    print(affinity.numpy().round(3))
    return 0
