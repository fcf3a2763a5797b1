"""The PASCAL-Context multi-task data module (``PASCAL_MT/``); the data set itself (layout, decoding, the
``Dataset``) is ``datamodules.datasets.pascal_context``, whose docstring states the decoding rules."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datamodules.base import DenseFileDataModule, merge_scales, select_tasks
from datamodules.datasets.pascal_context import (
    KINDS,
    LAYOUT,
    NORMALS_MASKS,
    PART_CLASSES,
    TASK_NAMES,
    VOC_CLASSES,
    PascalContextDataset,
    file_roles,
)
from datamodules.transforms import PAPER_SCALES
from dymu.tasks import Task, make_task

THREE_TASKS = ("semseg", "parts", "saliency")
DEFAULT_SCALES = {"semseg": 1.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0, "edges": 50.0}


def _make_task(name: str, scale: float) -> Task:
    if name == "semseg":
        return make_task("semseg", name="semseg", out_channels=len(VOC_CLASSES), scale=scale)
    if name == "parts":
        return make_task("semseg", name="parts", out_channels=len(PART_CLASSES), scale=scale)
    if name == "edges":
        return make_task("edges", name="edges", scale=scale, pos_weight=0.95)
    return make_task(name, name=name, scale=scale)


class PascalContext(DenseFileDataModule):
    """PASCAL-Context multi-task data from the ``PASCAL_MT`` folder (layout and decoding:
    ``datamodules.datasets.pascal_context``).

    Training samples are randomly scaled (``augment_scales``), cropped to ``crop_size`` after padding and
    flipped (normals' x negated); evaluation samples are padded to ``crop_size`` without resizing, so
    ``crop_size`` must be at least the largest image (PASCAL images are at most 500x500). Splits: train =
    ``ImageSets/Context/train.txt``; val and test = ``val.txt``. ``check_data`` checks the root, both lists and the
    folders the configured tasks need; setup checks in addition that every file of every listed id exists; a
    file's contents are checked when it is loaded (and image headers at evaluation setup).

    Args:
        root: the ``PASCAL_MT`` folder.
        tasks: names among ``semseg, parts, saliency, normals, edges``, in head order; defaults to all five
            (``THREE_TASKS`` is the paper's 3-task setting).
        crop_size: ``(H, W)`` of the network input.
        scales: loss scale per task name, overriding ``DEFAULT_SCALES`` (semseg 1, parts 2, saliency 5,
            normals 10, edges 50) for the tasks it names.
        augment_scales: scale factors drawn for training (the paper: 0.5 to 2.0 in steps of 0.25).
        normals_mask: ``"nyu_context"`` keeps normals only on the reference's NYU-v2 and Context classes
            (needs ``pascal-context/trainval``); ``"none"`` keeps them everywhere.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
    """

    layout = LAYOUT
    kinds = KINDS

    def __init__(
        self,
        root: str | Path = "data/PASCAL_MT",
        tasks: list[str] | None = None,
        crop_size: tuple[int, int] = (512, 512),
        scales: dict[str, float] | None = None,
        augment_scales: Sequence[float] = PAPER_SCALES,
        normals_mask: str = "nyu_context",
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root, crop_size, augment_scales, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        names = select_tasks(tasks, TASK_NAMES, default=TASK_NAMES)
        task_scales = merge_scales(names, DEFAULT_SCALES, scales)
        if normals_mask not in NORMALS_MASKS:
            raise ValueError(f"normals_mask {normals_mask!r} is not one of {list(NORMALS_MASKS)}: 'nyu_context' "
                             "keeps normals on the NYU-v2 / Context classes as the reference does, 'none' everywhere")
        self.normals_mask = normals_mask
        self._tasks = [_make_task(name, task_scales[name]) for name in names]

    @property
    def roles(self) -> list[str]:
        """``image``, the configured tasks' files and, for edges or masked normals, ``label_map``."""
        return file_roles(self.task_names, self.normals_mask)

    def make_dataset(self, split: str, train: bool) -> PascalContextDataset:
        """The dataset of ``split`` with the training augmentation when ``train`` is true, else padding only."""
        ids = self.split_ids(split)
        return PascalContextDataset(self.root, ids, self.task_names, self.transform(split, train, ids),
                                    self.normals_mask)
