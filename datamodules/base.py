"""What every data module shares (``MultiTaskDataModule``: split bookkeeping, loaders that keep every evaluation
sample exactly once under DDP, ``sample_inputs``, the ``check_data`` contract), the glue of task subsets and loss
scales, and what the dense on-disk data modules share on top (``DenseFileDataModule``: split lists, transform
choice, the evaluation-size check)."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from datamodules.datasets.files import DiskLayout, image_size, read_id_list
from datamodules.transforms import EvalTransform, TrainTransform
from dymu.tasks import Task

SPLITS = ("train", "val", "test")
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: SPLITS,
}


def make_loader(datamodule: MultiTaskDataModule, dataset: Dataset, shuffle: bool,
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
    num_workers = datamodule.num_workers
    return DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, drop_last=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, collate_fn=collate)


def select_tasks(tasks: Sequence[str] | None, known: Sequence[str], default: Sequence[str],
                 min_count: int = 1) -> list[str]:
    """The configured task names: ``tasks`` (``default`` when None), checked to be ``min_count`` to
    ``len(known)`` distinct names of ``known``.

    Raises:
        ValueError: naming the tasks, the allowed names and any unknown one.
    """
    names = list(default if tasks is None else tasks)
    unknown = [name for name in names if name not in known]
    if unknown or len(set(names)) != len(names) or not min_count <= len(names) <= len(known):
        raise ValueError(f"tasks {names} must be {min_count} to {len(known)} distinct names of {list(known)}"
                         + (f"; unknown: {unknown}" if unknown else ""))
    return names


def merge_scales(names: Sequence[str], defaults: Mapping[str, float],
                 scales: Mapping[str, float] | None) -> dict[str, float]:
    """The loss scale of every configured task: ``scales`` where given, else ``defaults``.

    Raises:
        ValueError: ``scales`` names a task that is not configured, or a scale is not a positive finite number.
    """
    given = dict(scales or {})
    extra = sorted(set(given) - set(names))
    if extra:
        raise ValueError(f"scales name task(s) {extra} that are not configured; configured: {list(names)}")
    for name, value in given.items():
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"scale of task {name!r} must be a positive finite number, got {value}")
    merged = {**defaults, **given}
    return {name: merged[name] for name in names}


def check_batch_fits(num_train: int, batch_size: int, source: str) -> None:
    """The train loader drops the last incomplete batch: refuse a training split smaller than one batch.

    Args:
        num_train: training samples.
        batch_size: samples per batch.
        source: what gives the training samples (a split list, an argument), named in the error.
    """
    if num_train < batch_size:
        raise ValueError(f"{source}: {num_train} training samples, fewer than batch_size ({batch_size}): the train "
                         "loader drops the last incomplete batch, so no batch would remain; lower batch_size")


def holdout_indices(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed random split of ``range(size)``: the kept ``(1 - fraction)`` of the indices, then the held-out
    ``fraction`` (``round(size * fraction)`` of them), from a permutation seeded by ``seed``.

    Raises:
        ValueError: ``fraction`` is not in (0, 1).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = size - round(size * fraction)
    return order[:cut], order[cut:]


class MultiTaskDataModule(lightning.LightningDataModule):
    """A multi-task data module over datasets of sample dicts (``{"image": ..., <task name>: target}``).

    Subclasses set ``self._tasks`` and implement ``input_shape``, ``make_dataset(split, train)`` and
    ``check_split(split)``. Training batches are shuffled and the last incomplete one is dropped (Lightning
    injects its ``DistributedSampler`` under DDP). Validation and test loaders use an unrepeated distributed
    sampler under DDP, so no sample is padded in twice and none is dropped: the torchmetrics states summed over
    ranks see every sample exactly once.

    ``holdout(fraction, seed)`` sets a fixed random part of the training set aside (a stage that trains part of
    its model on data the trainer's batches do not see, e.g. BMTAS's architecture split): it returns a loader over
    that part, and ``train_dataloader`` serves the rest from then on.

    ``check_data()`` is the cheap check a runner calls before any training: it verifies, without loading the
    data, that the data set exists and has the expected layout, and raises ``DatasetNotFoundError`` (a
    ``FileNotFoundError``; a one-line message naming the missing path, the root, the expected layout and where
    to get the data) or ``ValueError`` (a bad size or id list) otherwise. Building a split runs the same check.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
    """

    #: Whether training samples differ from evaluation ones (augmentation); if not, ``dataset(split, train)``
    #: builds one dataset per split.
    augmented: bool = True
    #: The training samples ``train_dataloader`` serves after ``holdout`` (None: all of them).
    _kept_train: list[int] | None = None

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
        """Shape of one network input, e.g. ``(C, H, W)``."""

    @abstractmethod
    def make_dataset(self, split: str, train: bool) -> Dataset:
        """The dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``) with training augmentation when
        ``train`` is true and the deterministic evaluation transform otherwise."""

    @abstractmethod
    def check_split(self, split: str) -> None:
        """The cheap check of what ``split`` needs (see ``check_data``); building the split runs it too."""

    def check_data(self) -> None:
        """Check, without loading the data set, that it exists and has the expected layout for every split
        (train, val, test).

        Raises:
            DatasetNotFoundError: the root, a split list, a folder or a file is missing (one line naming it,
                the root, the expected layout and where to get the data).
            ValueError: a size is invalid (generated data).
        """
        for split in SPLITS:
            self.check_split(split)

    def split_source(self, split: str) -> str:
        """What gives the samples of ``split`` (a file, an argument), as named in errors."""
        return f"the {split} split"

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Stack samples into a batch (subclasses may add keys)."""
        return default_collate(samples)

    def dataset(self, split: str, train: bool | None = None) -> Dataset:
        """The dataset of one split, built on first use (augmented for ``"train"`` unless ``train=False``).

        Raises:
            ValueError: an unknown split, or a training split smaller than ``batch_size``.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        train = split == "train" if train is None else train
        key = (split, train and self.augmented)
        if key not in self._datasets:
            data = self.make_dataset(*key)
            if split == "train" and train:
                check_batch_fits(len(data), self.batch_size, self.split_source(split))  # type: ignore[arg-type]
            self._datasets[key] = data
        return self._datasets[key]

    def setup(self, stage: str | None = None) -> None:
        """Build the splits a stage needs (fit: train and val; validate: val; test, predict: test; None: all)."""
        if stage not in STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGE_SPLITS)}")
        for split in STAGE_SPLITS[stage]:
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return make_loader(self, self.dataset(split), shuffle, self.collate)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (augmented) training batches; the last incomplete batch is dropped. After ``holdout``, only the
        samples it kept."""
        if self._kept_train is not None:
            return make_loader(self, Subset(self.dataset("train"), self._kept_train), True, self.collate)
        return self._loader("train", shuffle=True)

    def holdout(self, fraction: float, seed: int) -> DataLoader:
        """Set a fixed random ``fraction`` of the training set aside (``holdout_indices(len, fraction, seed)``: the
        same samples for the same seed) and return a loader over it, built like the training loader (shuffled,
        augmented, the last incomplete batch dropped, the same on every DDP process: Lightning's sampler does
        not reach it). From now on ``train_dataloader`` serves only the kept samples; a later ``holdout``
        replaces this one (the split is always of the whole training set).

        Raises:
            ValueError: ``fraction`` is not in (0, 1), or either part is smaller than ``batch_size``.
        """
        data = self.dataset("train")
        size = len(data)  # type: ignore[arg-type]
        kept, held_out = holdout_indices(size, fraction, seed)
        if min(len(kept), len(held_out)) < self.batch_size:
            raise ValueError(f"holding out {fraction:.0%} of the {size} training samples leaves {len(kept)} / "
                             f"{len(held_out)}, a part smaller than batch_size ({self.batch_size}); use more "
                             "training data, a smaller batch or another fraction")
        self._kept_train = kept
        return make_loader(self, Subset(data, held_out), True, self.collate)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, every sample exactly once (also under DDP)."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order, every sample exactly once (also under DDP)."""
        return self._loader("test", shuffle=False)

    def sample_inputs(self, k: int, seed: int = 0) -> Tensor:
        """``k`` distinct training inputs with the evaluation transform, stacked to ``(k, *input_shape)``.

        Args:
            k: how many inputs (at most the training set's size).
            seed: seed of the pick; the same seed gives the same inputs.
        """
        data = self.dataset("train", train=False)
        n = len(data)  # type: ignore[arg-type]
        if not 1 <= k <= n:
            raise ValueError(f"k must be between 1 and the number of training samples ({n}), got {k}")
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
        return torch.stack([data[int(i)]["image"] for i in index])


class DenseFileDataModule(MultiTaskDataModule):
    """Dense multi-task data under a root with one id list per split (PASCAL-Context, NYU-v2).

    Subclasses set the class attributes ``layout`` (``DiskLayout`` with ``files`` and ``split_lists``) and
    ``kinds`` (sample key -> transform kind), and implement ``roles`` (the file roles the configured tasks need).
    A split is indexed once: its layout (``check_split``: the root, the id list, the folders of ``roles``), its
    ids (``read_id_list``) and every listed id's files. Training samples get ``TrainTransform`` (random scale
    from ``augment_scales``, random crop to ``crop_size`` after padding, flip); evaluation samples are padded to
    ``crop_size`` (``EvalTransform``), which must hold every evaluation image.

    Args:
        root: the data set's folder.
        crop_size: ``(H, W)`` of the network input.
        augment_scales: scale factors drawn for training.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
    """

    layout: DiskLayout
    kinds: Mapping[str, str]

    def __init__(self, root: str | Path, crop_size: Sequence[int], augment_scales: Sequence[float],
                 batch_size: int, num_workers: int) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if len(crop_size) != 2 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in crop_size):
            raise ValueError(f"crop_size must be two positive integers (H, W), got {list(crop_size)}")
        if not augment_scales or any(not math.isfinite(s) or s <= 0 for s in augment_scales):
            raise ValueError(f"augment_scales must be positive numbers, got {list(augment_scales)}")
        self.root = Path(root)
        self.crop_size: tuple[int, int] = (int(crop_size[0]), int(crop_size[1]))
        self.augment_scales = [float(s) for s in augment_scales]
        self._ids: dict[Path, list[str]] = {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(3, *crop_size)``."""
        return (3, *self.crop_size)

    @property
    @abstractmethod
    def roles(self) -> list[str]:
        """The per-sample file roles (keys of ``layout.files``) the configured tasks need."""

    def check_split(self, split: str) -> None:
        """The root, the id list of ``split`` and the folders of the configured tasks exist (no file is read)."""
        self.layout.check_split(self.root, split, self.roles)

    def split_source(self, split: str) -> str:
        return str(self.layout.split_list(self.root, split))

    def split_ids(self, split: str) -> list[str]:
        """The ids of a split's list (val and test share one), after ``check_split`` and checking that every
        file the configured tasks need exists.

        Raises:
            DatasetNotFoundError: the root, the list, a folder or a file of a listed id is missing.
            ValueError: the list names no id, or an id twice.
        """
        list_path = self.layout.split_list(self.root, split)
        if list_path not in self._ids:
            self.check_split(split)
            ids = read_id_list(list_path)
            self.layout.check_samples(self.root, self.roles, ids, list_path)
            self._ids[list_path] = ids
        return list(self._ids[list_path])

    def image_path(self, image_id: str) -> Path:
        """The image file of one id."""
        return self.layout.candidates(self.root, "image", image_id)[0]

    def transform(self, split: str, train: bool, ids: Sequence[str],
                  sizes: Sequence[tuple[int, int]] | None = None) -> TrainTransform | EvalTransform:
        """The training augmentation when ``train``, else the padding to ``crop_size`` after checking that every
        image of ``ids`` fits it (their ``sizes``, or else their headers, are read).

        Raises:
            ValueError: (evaluation) an image is larger than ``crop_size``, or its header is unreadable.
        """
        kinds = {key: self.kinds[key] for key in ("image", *self.task_names)}
        if train:
            return TrainTransform(kinds, self.crop_size, self.augment_scales)
        if sizes is None:
            sizes = [image_size(self.image_path(image_id)) for image_id in ids]
        too_large = [i for i, (h, w) in zip(ids, sizes) if h > self.crop_size[0] or w > self.crop_size[1]]
        if too_large:
            height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
            raise ValueError(f"{self.split_source(split)} lists images up to {height} x {width} (e.g. "
                             f"{self.image_path(too_large[0])}), larger than crop_size {self.crop_size[0]} x "
                             f"{self.crop_size[1]}: evaluation pads to crop_size and never crops; set crop_size to at "
                             f"least [{height}, {width}]")
        return EvalTransform(kinds, self.crop_size)
