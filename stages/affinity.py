"""The RSA task affinity of a finished anchor, computed once and saved in the run directory."""

from __future__ import annotations

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
