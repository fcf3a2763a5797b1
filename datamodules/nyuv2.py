"""The NYU-v2 multi-task data module (``NYUD_MT/``); the data set itself (layout, decoding, the ``Dataset``) is
``datamodules.datasets.nyuv2``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datamodules.base import DenseFileDataModule, merge_scales, select_tasks
from datamodules.datasets.nyuv2 import KINDS, LAYOUT, NUM_CLASSES, NYU_TASKS, NYUv2Dataset, read_sizes
from datamodules.transforms import PAPER_SCALES
from dymu.tasks import make_task

DEFAULT_TASKS = ("semseg", "normals", "depth")
DEFAULT_SCALES: dict[str, float] = {"semseg": 1.0, "normals": 10.0, "depth": 3.0, "edges": 50.0}
EDGE_POS_WEIGHT = 0.8


class NYUv2(DenseFileDataModule):
    """NYU-v2 multi-task (the ``NYUD_MT`` release; layout in ``datamodules.datasets.nyuv2.LAYOUT``): 40-class
    semantic segmentation, surface normals, depth and edges.

    Splits: ``train`` = ``gt_sets/train.txt``; ``val`` and ``test`` = ``gt_sets/val.txt`` (the release has
    no other held-out list). Training samples get the BMTAS augmentation (``TrainTransform``: random scale
    from ``augment_scales``, random crop to ``crop_size`` after padding, horizontal flip that negates the
    normals' x; depth values are resampled by nearest neighbour and never rescaled, where the
    Multi-Task-Learning-PyTorch NYUD transform divides depth by the scale factor). Validation and test samples
    are padded to ``crop_size`` (``EvalTransform``), never resized or cropped. ``check_data`` checks the root,
    both lists and the folders of the configured tasks; setup checks in addition every listed id's files and
    their headers.

    Targets: ``semseg`` ``(H, W)`` long, classes 0..39, 255 for unlabeled and padding; ``normals``
    ``(3, H, W)`` unit vectors, zero where invalid or padded; ``depth`` ``(1, H, W)`` metres, 0 where invalid
    or padded; ``edges`` ``(1, H, W)`` float 0 / 1, 255 where padded.

    Loss scales ``w_t`` (``DEFAULT_SCALES``): semseg 1, normals 10, depth 3 are DYMU's for NYU-v2; DYMU does
    not use edges on NYU-v2, so the edge scale 50 is BMTAS's (PASCAL-Context). The edge loss weights
    positives by ``edge_pos_weight``, 0.8 for NYU-v2 (BMTAS); the public Multi-Task-Learning-PyTorch NYUD
    configs use 0.95, PASCAL's value.

    Args:
        root: the ``NYUD_MT`` directory.
        tasks: 1 to 4 distinct names among ``semseg, normals, depth, edges``, in head order; defaults to
            ``["semseg", "normals", "depth"]`` (DYMU's NYU-v2 setting).
        crop_size: (H, W) of training crops and of the evaluation padding; at least the image size (480 x 640).
        scales: loss scale per task name, overriding ``DEFAULT_SCALES`` for the tasks it names.
        augment_scales: scale factors of the training augmentation (0.5 to 2.0 in steps of 0.25 by default).
        edge_pos_weight: weight of edge pixels in the edge loss (non-edges get ``1 - edge_pos_weight``).
        normals_tolerance: how far a stored normal's components may leave [-1, 1] and its length leave 1
            before the file is refused; accepted normals are rescaled to unit length.
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader worker processes.
    """

    layout = LAYOUT
    kinds = KINDS

    def __init__(
        self,
        root: str | Path,
        tasks: Sequence[str] | None = None,
        crop_size: Sequence[int] = (480, 640),
        scales: dict[str, float] | None = None,
        augment_scales: Sequence[float] = PAPER_SCALES,
        edge_pos_weight: float = EDGE_POS_WEIGHT,
        normals_tolerance: float = 0.1,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> None:
        super().__init__(root, crop_size, augment_scales, batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        names = select_tasks(tasks, NYU_TASKS, default=DEFAULT_TASKS)
        task_scales = merge_scales(names, DEFAULT_SCALES, scales)
        if not 0 < edge_pos_weight < 1:
            raise ValueError(f"edge_pos_weight must lie strictly between 0 and 1, got {edge_pos_weight}")
        if not 0 <= normals_tolerance < 1:
            raise ValueError(f"normals_tolerance must lie in [0, 1), got {normals_tolerance}")
        self.normals_tolerance = float(normals_tolerance)
        self._tasks = [
            make_task("semseg", out_channels=NUM_CLASSES, scale=task_scales[name]) if name == "semseg"
            else make_task("edges", scale=task_scales[name], pos_weight=edge_pos_weight) if name == "edges"
            else make_task(name, scale=task_scales[name])
            for name in names
        ]
        self._sizes: dict[Path, list[tuple[int, int]]] = {}

    @property
    def roles(self) -> list[str]:
        """``image`` and the configured tasks, in head order."""
        return ["image", *self.task_names]

    def image_sizes(self, split: str) -> list[tuple[int, int]]:
        """``(H, W)`` of every image of the split's list (``split_ids`` order), read from the headers after
        checking that every label's header fits its image.

        Raises:
            DatasetNotFoundError: see ``split_ids``.
            ValueError: a header is unreadable or does not fit its image.
        """
        list_path = self.layout.split_list(self.root, split)
        if list_path not in self._sizes:
            self._sizes[list_path] = read_sizes(self.root, self.split_ids(split), self.task_names)
        return list(self._sizes[list_path])

    def make_dataset(self, split: str, train: bool) -> NYUv2Dataset:
        """The dataset of ``split`` with the training augmentation when ``train`` is true and the padding
        evaluation transform otherwise.

        Raises:
            DatasetNotFoundError: the root, the split's list, a folder or a file of a listed id is missing.
            ValueError: a file's header does not fit (size, shape, dtype, PNG mode), or (evaluation) an image is
                larger than ``crop_size``.
        """
        ids, sizes = self.split_ids(split), self.image_sizes(split)
        return NYUv2Dataset(self.root, ids, sizes, self.task_names, self.transform(split, train, ids, sizes),
                            self.normals_tolerance)
