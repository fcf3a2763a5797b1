"""CIFAR-100 as 20 five-way classification tasks, one per superclass: the data module. The data set itself
(layout, the checked pickles, labels, normalisation and augmentation, the ``Dataset``) is
``datamodules.datasets.cifar100``, whose docstring states the rules.

Each image belongs to one task. A sample is ``{"image", "task", "label"}``; ``collate`` adds one key per task
holding the label where the image is that task's and 255 (ignored by ``Classification``) elsewhere, so each
task's loss is over its own images and ``dymu.tasks.task_losses`` works unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from datamodules.base import MultiTaskDataModule
from datamodules.datasets.cifar100 import (
    CLASSES_PER_TASK,
    COARSE_LABEL_NAMES,
    FOLDER,
    IMAGE_SHAPE,
    LAYOUT,
    CIFAR100File,
    CIFAR100TaskDataset,
    read_meta,
    read_split,
)
from dymu.tasks import IGNORE_INDEX, Task, make_task


class CIFAR100MultiTask(MultiTaskDataModule):
    """CIFAR-100 as 20 five-way classification tasks, one per superclass (scale 1 each).

    Reads ``root/cifar-100-python/{train,test,meta}`` (the python version users download). Nothing is written
    into ``root``. The train pickle is read once and shared by the train and held-out validation splits.
    ``check_data`` checks that the root, the folder and the three files exist (unless ``download=True``);
    setup reads and checks the pickles a stage needs.

    Args:
        root: the folder that holds ``cifar-100-python/``.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        val_size: 0 validates on the test set (the paper reports test numbers); ``n > 0`` holds out ``n``
            training images, picked by a permutation seeded with ``seed``, and trains on the rest.
        seed: seed of the held-out pick.
        augment: cifar10-fast augmentation of training images (reflect-pad 4, random 32 x 32 crop, flip).
        download: let ``prepare_data`` fetch the data with ``torchvision.datasets.CIFAR100(root, download=True)``.
    """

    def __init__(self, root: str | Path, batch_size: int = 128, num_workers: int = 0, val_size: int = 0,
                 seed: int = 0, augment: bool = True, download: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        if val_size < 0:
            raise ValueError(f"val_size must be 0 (validate on the test set) or a positive number of training "
                             f"images to hold out, got {val_size}")
        self.root = Path(root)
        self.folder = self.root / FOLDER
        self.val_size, self.seed, self.augment, self.download = val_size, seed, augment, download
        self._files: dict[str, CIFAR100File] = {}
        self._names: list[str] | None = None
        self._names_from_meta = False
        self._tasks: list[Task] = []

    def _file(self, name: str) -> Path:
        """``cifar-100-python/<name>`` after checking that it, its folder and the root exist."""
        path = self.folder / name
        LAYOUT.require(self.root, [self.folder], [path])
        return path

    def split_file(self, split: str) -> str:
        """The pickle a split reads: ``test`` for test (and for val when ``val_size`` is 0), else ``train``."""
        return "test" if split == "test" or (split == "val" and self.val_size == 0) else "train"

    def check_split(self, split: str) -> None:
        """The root, ``cifar-100-python/``, ``meta`` and the split's pickle exist (nothing is read)."""
        for name in ("meta", self.split_file(split)):
            self._file(name)

    def check_data(self) -> None:
        """``check_split`` of every split; with ``download=True`` nothing is checked (``prepare_data`` fetches
        the files)."""
        if not self.download:
            super().check_data()

    def split_source(self, split: str) -> str:
        return str(self.folder / self.split_file(split))

    def _superclass_names(self, require_file: bool = False) -> list[str]:
        """The task names: ``meta``'s ``coarse_label_names`` once the file is there (checked against the names
        already handed out), CIFAR-100's own names before (``dymu info`` and the CLI's model construction ask
        for the tasks without data; ``setup`` requires the file)."""
        if self._names_from_meta:
            assert self._names is not None
            return self._names
        if not (self.folder / "meta").is_file() and not require_file:
            self._names = list(COARSE_LABEL_NAMES)
            return self._names
        path = self._file("meta")
        names = read_meta(path)
        if self._names is not None and names != self._names:
            raise ValueError(f"{path}: superclass names {names} differ from the tasks already configured "
                             f"({self._names})")
        self._names, self._names_from_meta = names, True
        return names

    @property
    def tasks(self) -> list[Task]:
        """20 five-way classification tasks named after ``meta``'s ``coarse_label_names``, in coarse order."""
        names = self._superclass_names()
        if [t.name for t in self._tasks] != names:
            self._tasks = [make_task("classification", name, out_channels=CLASSES_PER_TASK, scale=1.0)
                           for name in names]
        return list(self._tasks)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(3, 32, 32)``."""
        return IMAGE_SHAPE

    def prepare_data(self) -> None:
        """Download the data with torchvision when ``download=True``; otherwise do nothing."""
        if self.download:
            from torchvision.datasets import CIFAR100

            CIFAR100(str(self.root), train=True, download=True)

    def read(self, name: str) -> CIFAR100File:
        """The checked contents of the ``train`` or ``test`` pickle, read on first use.

        Raises:
            DatasetNotFoundError: the root, ``cifar-100-python/`` or the file is missing.
            ValueError: the file is malformed, or its fine -> coarse map differs from a file read before.
        """
        if name not in self._files:
            data = read_split(self._file(name))
            for other in self._files.values():
                if not np.array_equal(other.fine_to_coarse, data.fine_to_coarse):
                    raise ValueError(f"{data.path}: its fine -> coarse map differs from that of {other.path}; "
                                     "both files must come from the same CIFAR-100 release")
            self._files[name] = data
        return self._files[name]

    def split_indices(self, split: str) -> Tensor:
        """Rows of the split's file (``train`` for train and held-out val, else ``test``) that ``split`` uses."""
        if self.split_file(split) == "test":
            return torch.arange(len(self.read("test").images))
        n = len(self.read("train").images)
        if self.val_size >= n:
            raise ValueError(f"val_size ({self.val_size}) must be smaller than the {n} training images in "
                             f"{self.folder / 'train'}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        rows = order[:self.val_size] if split == "val" else order[self.val_size:]
        return rows.sort().values

    def make_dataset(self, split: str, train: bool) -> Dataset:
        """The dataset of ``split``; augmented when ``train`` and ``augment`` are both true."""
        self._superclass_names(require_file=True)
        indices = self.split_indices(split)
        return CIFAR100TaskDataset(self.read(self.split_file(split)), indices, augment=train and self.augment)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Stack samples and add, per task name, the 5-way label where the image is that task's, else 255."""
        batch = default_collate(samples)
        for t, name in enumerate(self.task_names):
            batch[name] = torch.where(batch["task"] == t, batch["label"], IGNORE_INDEX)
        return batch
