"""What the file-backed data modules share: split bookkeeping, loaders that keep every validation sample
exactly once under DDP, and ``sample_inputs`` for the affinity stage."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import lightning
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from dymu.tasks import Task

STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}


def make_loader(datamodule: lightning.LightningDataModule, dataset: Dataset, shuffle: bool,
                collate: Callable | None = None) -> DataLoader:
    """The loader every data module uses: shuffled training batches without the last incomplete one
    (Lightning injects its ``DistributedSampler`` under DDP), or evaluation batches in a fixed order that,
    under DDP, come from an unrepeated distributed sampler, so that each sample counts exactly once in the
    metrics summed over ranks. ``datamodule`` supplies ``batch_size``, ``num_workers`` and its trainer."""
    sampler = None
    trainer = getattr(datamodule, "trainer", None)
    if not shuffle and trainer is not None and trainer.world_size > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False)
    num_workers = datamodule.num_workers  # type: ignore[attr-defined]
    return DataLoader(dataset, batch_size=datamodule.batch_size,  # type: ignore[attr-defined]
                      shuffle=shuffle and sampler is None, sampler=sampler, drop_last=shuffle,
                      num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=collate)


class FileDataModule(lightning.LightningDataModule):
    """A data module over files on disk.

    Subclasses implement ``make_dataset(split, train)`` (``train`` selects the random augmentation), and the
    ``tasks`` and ``input_shape`` properties. Training batches are shuffled and the last incomplete one is
    dropped (Lightning injects its ``DistributedSampler`` under DDP). Validation and test loaders use an
    unrepeated distributed sampler under DDP, so no sample is padded in twice and none is dropped: the
    torchmetrics states summed over ranks see every sample exactly once.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._datasets: dict[tuple[str, bool], Dataset] = {}

    _tasks: list[Task]

    @property
    def tasks(self) -> list[Task]:
        """The configured tasks, in head order, with their loss scales (subclasses set ``self._tasks``)."""
        return list(self._tasks)

    @property
    def task_names(self) -> list[str]:
        """Names of the configured tasks; also their keys in a batch."""
        return [t.name for t in self.tasks]

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one network input, ``(C, H, W)``."""

    @abstractmethod
    def make_dataset(self, split: str, train: bool) -> Dataset:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``) with training augmentation when
        ``train`` is true and the deterministic evaluation transform otherwise."""

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Stack samples into a batch (subclasses may add keys)."""
        return default_collate(samples)

    def dataset(self, split: str, train: bool | None = None) -> Dataset:
        """The dataset of one split, built on first use (augmented for ``"train"`` unless ``train=False``)."""
        if split not in STAGE_SPLITS[None]:
            raise ValueError(f"unknown split {split!r}; choose one of {list(STAGE_SPLITS[None])}")
        train = split == "train" if train is None else train
        if (split, train) not in self._datasets:
            self._datasets[(split, train)] = self.make_dataset(split, train)
        return self._datasets[(split, train)]

    def setup(self, stage: str | None = None) -> None:
        """Index the splits a stage needs (fit: train and val; validate: val; test, predict: test)."""
        if stage not in STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGE_SPLITS)}")
        for split in STAGE_SPLITS[stage]:
            self.dataset(split)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return make_loader(self, dataset, shuffle, self.collate)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches; the last incomplete batch is dropped."""
        return self._loader(self.dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, every sample exactly once (also under DDP)."""
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order, every sample exactly once (also under DDP)."""
        return self._loader(self.dataset("test"), shuffle=False)

    def sample_inputs(self, k: int, seed: int = 0) -> Tensor:
        """``k`` distinct training images with the evaluation transform, stacked to ``(k, *input_shape)``.

        Args:
            k: how many images (at most the training set's size).
            seed: seed of the pick; the same seed gives the same images.
        """
        data = self.dataset("train", train=False)
        n = len(data)  # type: ignore[arg-type]
        if not 1 <= k <= n:
            raise ValueError(f"k must be between 1 and the number of training samples ({n}), got {k}")
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
        return torch.stack([data[int(i)]["image"] for i in index])
