"""The CIFAR-100 data set as 20 five-way classification tasks, read from the python pickles users already have:
layout, reading and checking the pickles, the ``Dataset`` (the data module is
``datamodules.cifar100.CIFAR100MultiTask``).

Each superclass (coarse label) is a task; within a task the label is the rank of the image's fine label among
the sorted fine labels of its superclass (docs/datasets.md; ``fine % 5`` would merge two classes in every superclass).
The fine -> coarse map comes from the file's own labels and is checked: every fine label in exactly one
superclass, five per superclass, the same map in every file read.

Each image belongs to one task. A sample is ``{"image", "task", "label"}``; ``collate`` adds one key per task
holding the label where the image is that task's and 255 (ignored by ``Classification``) elsewhere, so each
task's loss is over its own images and ``dymu.tasks.task_losses`` works unchanged.

Images are normalised with the CIFAR-100 training set's per-channel mean and standard deviation (on 0..1
intensities), not to the [-1, 1] of the dense data sets: that is what ResNet-9 / cifar10-fast recipes train
on. Training augmentation is cifar10-fast's: reflect-pad 4, random 32 x 32 crop, horizontal flip.

The pickles are read with a restricted unpickler that only builds numpy arrays, so a tampered file in a data
directory cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.datasets.files import DiskLayout

FOLDER = "cifar-100-python"
NUM_FINE, NUM_COARSE, CLASSES_PER_TASK = 100, 20, 5
IMAGE_SHAPE = (3, 32, 32)
# Per-channel mean and std of the 50000 training images on 0..1 intensities (the widely used values).
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)
PADDING = 4
# The real meta file's names; used only until ``meta`` exists (download=True before prepare_data ran).
COARSE_LABEL_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)  # fmt: skip
RESERVED_KEYS = ("image", "task", "label")

LAYOUT = DiskLayout(
    dataset="CIFAR-100",
    lines=(
        f"{FOLDER}/train (pickle: data uint8 (50000, 3072), fine_labels, coarse_labels)",
        f"{FOLDER}/test (pickle: data uint8 (10000, 3072), fine_labels, coarse_labels)",
        f"{FOLDER}/meta (pickle: fine_label_names (100), coarse_label_names (20))",
    ),
    source=("Get it from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into the root, "
            "or pass download=True to fetch it with torchvision in prepare_data."),
)

_MEAN = torch.tensor(CIFAR100_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CIFAR100_STD, dtype=torch.float32).view(3, 1, 1)

# What the real pickles (numpy arrays written by Python 2) and numpy's own pickles of arrays reference.
_ALLOWED_GLOBALS = {
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in ((f"{prefix}.multiarray", "_reconstruct"), (f"{prefix}.multiarray", "scalar"),
                         (f"{prefix}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-100 pickle holds only "
                                         "numpy arrays, lists, numbers and strings")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR-100 python pickle (a dict) as torchvision does (``encoding="latin1"``).

    Raises:
        ValueError: the file is not a pickled dict of numpy arrays, lists, numbers and strings.
    """
    with open(path, "rb") as f:
        try:
            content = _ArrayUnpickler(f, encoding="latin1").load()
        except Exception as error:  # a corrupt pickle can fail in many ways; all mean "not this format"
            reason = f"{type(error).__name__}: {error}"
            raise ValueError(f"{path}: not a readable CIFAR-100 python pickle ({reason})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


def _require_keys(content: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    missing = [key for key in keys if key not in content]
    if missing:
        raise ValueError(f"{path}: no key(s) {missing}; a CIFAR-100 {path.name} pickle has {list(keys)} "
                         f"(found {sorted(map(str, content))})")


def read_meta(path: Path) -> list[str]:
    """The 20 superclass names of a ``meta`` pickle, in coarse-label order (fine names are checked too).

    Raises:
        ValueError: a key is missing, or the names are not 100 / 20 distinct strings.
    """
    content = load_pickle(path)
    _require_keys(content, ("fine_label_names", "coarse_label_names"), path)
    for key, count in (("fine_label_names", NUM_FINE), ("coarse_label_names", NUM_COARSE)):
        names = content[key]
        if (not isinstance(names, list | tuple) or len(names) != count
                or not all(isinstance(n, str) and n for n in names) or len(set(names)) != count):
            raise ValueError(f"{path}: {key} must be a list of {count} distinct non-empty strings, got {names!r}")
    coarse = list(content["coarse_label_names"])
    clash = sorted(set(coarse) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"{path}: superclass name(s) {clash} clash with the batch keys {list(RESERVED_KEYS)}")
    return coarse


def _labels(content: dict[str, Any], key: str, n: int, high: int, path: Path) -> np.ndarray:
    labels = np.asarray(content[key])
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {key} must be {n} integers (one per row of data), got an array of shape "
                         f"{labels.shape} and dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= high:
        raise ValueError(f"{path}: {key} must lie in 0..{high - 1}, found {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def superclass_ranks(fine: np.ndarray, coarse: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The fine -> coarse map of a file and each fine label's rank within its superclass.

    Args:
        fine: fine label per image, 0..99.
        coarse: coarse label per image, 0..19.
        path: the file the labels come from (named in errors).

    Returns:
        ``(fine_to_coarse, fine_to_rank)``, both ``(100,)`` int64.

    Raises:
        ValueError: a fine label appears under two superclasses, or a superclass has not exactly 5 fine labels.
    """
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
    fine_to_coarse = np.full(NUM_FINE, -1, dtype=np.int64)
    for f in np.unique(pairs[:, 0]):
        superclasses = pairs[pairs[:, 0] == f, 1]
        if len(superclasses) > 1:
            raise ValueError(f"{path}: fine label {f} appears under superclasses {superclasses.tolist()}; each fine "
                             "label must belong to exactly one superclass")
        fine_to_coarse[f] = superclasses[0]
    counts = np.bincount(fine_to_coarse[fine_to_coarse >= 0], minlength=NUM_COARSE)
    wrong = {c: int(k) for c, k in enumerate(counts) if k != CLASSES_PER_TASK}
    if wrong:
        raise ValueError(f"{path}: every superclass needs exactly {CLASSES_PER_TASK} fine labels; superclass -> "
                         f"number of fine labels found: {wrong}")
    fine_to_rank = np.zeros(NUM_FINE, dtype=np.int64)
    for c in range(NUM_COARSE):
        members = np.flatnonzero(fine_to_coarse == c)  # sorted ascending
        fine_to_rank[members] = np.arange(CLASSES_PER_TASK)
    return fine_to_coarse, fine_to_rank


@dataclass
class CIFAR100File:
    """One split file in tensors.

    Attributes:
        path: the pickle it was read from.
        images: ``(n, 3, 32, 32)`` uint8.
        task: ``(n,)`` long, the superclass 0..19.
        label: ``(n,)`` long, the 5-way label 0..4.
        fine: ``(n,)`` long, the fine label 0..99.
        fine_to_coarse: ``(100,)`` the file's fine -> coarse map.
    """

    path: Path
    images: Tensor
    task: Tensor
    label: Tensor
    fine: Tensor
    fine_to_coarse: np.ndarray


def read_split(path: Path) -> CIFAR100File:
    """Read and check a ``train`` or ``test`` pickle.

    Raises:
        ValueError: a key is missing, ``data`` is not uint8 ``(n, 3072)``, labels are out of range or do not
            match the rows, or the fine -> coarse map is inconsistent (see ``superclass_ranks``).
    """
    content = load_pickle(path)
    _require_keys(content, ("data", "fine_labels", "coarse_labels"), path)
    data = content["data"]
    row = int(np.prod(IMAGE_SHAPE))
    is_array = isinstance(data, np.ndarray)
    if not (is_array and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == row and len(data) > 0):
        found = f"{data.dtype} array of shape {data.shape}" if is_array else type(data).__name__
        raise ValueError(f"{path}: data must be a uint8 array of shape (n, {row}) with n >= 1 (one 3 x 32 x 32 "
                         f"image per row, channel-major), got {found}")
    n = data.shape[0]
    fine = _labels(content, "fine_labels", n, NUM_FINE, path)
    coarse = _labels(content, "coarse_labels", n, NUM_COARSE, path)
    fine_to_coarse, fine_to_rank = superclass_ranks(fine, coarse, path)
    images = np.ascontiguousarray(data).reshape(n, *IMAGE_SHAPE)
    if not images.flags.writeable:
        images = images.copy()
    return CIFAR100File(path=path, images=torch.from_numpy(images), task=torch.from_numpy(coarse),
                        label=torch.from_numpy(fine_to_rank[fine]), fine=torch.from_numpy(fine),
                        fine_to_coarse=fine_to_coarse)


def normalize(images: Tensor) -> Tensor:
    """uint8 images ``(..., 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` with the CIFAR-100 statistics."""
    return (images.float() / 255.0 - _MEAN) / _STD


def random_crop_flip(image: Tensor, padding: int = PADDING, generator: torch.Generator | None = None) -> Tensor:
    """cifar10-fast augmentation: reflect-pad ``padding`` pixels, crop a random window of the original size,
    flip left-right with probability 0.5.

    Args:
        image: ``(C, H, W)`` float.
        padding: pixels added on every side before the crop.
        generator: random source; the global torch generator (seeded per DataLoader worker) by default.
    """
    h, w = image.shape[-2:]
    padded = F.pad(image[None], (padding,) * 4, mode="reflect")[0]
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    out = padded[:, top:top + h, left:left + w]
    if torch.rand((), generator=generator) < 0.5:
        out = out.flip(-1)
    return out.contiguous()


class CIFAR100TaskDataset(Dataset):
    """Rows ``indices`` of a split file; item ``i`` is ``{"image": (3, 32, 32) float, "task": long, "label":
    long}``.

    Args:
        data: the split file.
        indices: the file rows this dataset serves, in order.
        augment: whether to apply ``random_crop_flip``.
        generator: random source of the augmentation (global torch generator by default).
    """

    def __init__(self, data: CIFAR100File, indices: Tensor, augment: bool,
                 generator: torch.Generator | None = None) -> None:
        self.data, self.indices, self.augment, self.generator = data, indices, augment, generator

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = int(self.indices[index])
        image = normalize(self.data.images[row])
        if self.augment:
            image = random_crop_flip(image, generator=self.generator)
        return {"image": image, "task": self.data.task[row], "label": self.data.label[row]}
