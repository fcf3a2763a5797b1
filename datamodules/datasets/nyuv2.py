"""The NYU-v2 multi-task data set: semantic segmentation (40 classes), surface normals, depth and edges, read
from the ``NYUD_MT`` release as it is distributed (the ASTMT / Multi-Task-Learning-PyTorch layout): layout,
decoding and the ``Dataset`` of one id list (the data module is ``datamodules.nyuv2.NYUv2``).

Decoding follows that release's reference loader (``data/nyud.py``): the segmentation PNG holds 0 for
unlabeled pixels (-> 255, ignored) and 1..40 for the classes (-> 0..39); depth ``.npy`` files hold metres
with 0 for invalid pixels; normals ``.npy`` files hold ``(H, W, 3)`` vectors with the zero vector for invalid
pixels; edge ``.npy`` files hold a binary map. Where the reference loader silently resizes a label whose
size differs from its image, this one refuses the file: a label of another size is a different data set.

Nothing is ever written into the data directory. Cheap checks (the root, the split lists, the folders, that
every listed id has its files, file headers: image sizes, PNG modes, ``.npy`` shapes and dtypes) run when a
split is built, so a broken data set fails at ``setup``; value checks (class range, normals' range, depth
sign) run when a sample is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.datasets.files import DiskLayout, image_size, read_rgb
from dymu.tasks import IGNORE_INDEX

NYU_TASKS = ("semseg", "normals", "depth", "edges")
NUM_CLASSES = 40
# NYU-v2's Kinect reaches about 10 m; larger values mean another unit (millimetres), not a far wall.
MAX_DEPTH_M = 100.0

# Sample key -> transform kind (datamodules.transforms).
KINDS = {"image": "image", "semseg": "label", "edges": "label", "normals": "normals", "depth": "depth"}
_PNG_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")

LAYOUT = DiskLayout(
    dataset="NYU-v2",
    lines=(
        "images/<id>.jpg (RGB image, 480 x 640)",
        "segmentation/<id>.png (single-channel class index: 0 unlabeled, 1..40 the NYU-40 classes)",
        "depth/<id>.npy (float (H, W) depth in metres, 0 = invalid)",
        "normals/<id>.npy (float (H, W, 3) unit normals, zero vector = invalid)",
        "edge/<id>.npy ((H, W) edge map with values 0 / 1)",
        "gt_sets/train.txt (training ids, one per line)",
        "gt_sets/val.txt (validation and test ids, one per line)",
        "only the folders of the configured tasks are needed",
    ),
    source=("Get NYUD_MT.tgz, the multi-task NYU-v2 release of ASTMT / Multi-Task-Learning-PyTorch "
            "(https://drive.google.com/file/d/14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw), extract it and pass the extracted "
            "NYUD_MT directory as root."),
    # Sample key -> (folder, extension) under the root.
    files={
        "image": (("images", ".jpg"),),
        "semseg": (("segmentation", ".png"),),
        "depth": (("depth", ".npy"),),
        "normals": (("normals", ".npy"),),
        "edges": (("edge", ".npy"),),
    },
    # The release has no separate test list: test is val, as in DYMU.
    split_lists={"train": "gt_sets/train.txt", "val": "gt_sets/val.txt", "test": "gt_sets/val.txt"},
)


def sample_path(root: Path, key: str, image_id: str) -> Path:
    """Path of one file of the data set.

    Args:
        root: the ``NYUD_MT`` directory.
        key: ``image`` or a task name (``semseg``, ``normals``, ``depth``, ``edges``).
        image_id: an id from a ``gt_sets`` list.
    """
    return LAYOUT.candidates(root, key, image_id)[0]


# ----------------------------------------------------------------------------------------------------------
# Headers (read at setup) and contents (read per sample)
# ----------------------------------------------------------------------------------------------------------


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header only.

    Raises:
        ValueError: the file is not a ``.npy`` file.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, SyntaxError) as error:
        raise ValueError(f"{path}: not a NumPy .npy file ({error})") from error
    return tuple(shape), np.dtype(dtype)


def _check_npy_header(path: Path, key: str, size: tuple[int, int], image: Path) -> None:
    shape, dtype = npy_header(path)
    height, width = size
    if key == "normals":
        shapes, wanted = [(height, width, 3)], f"({height}, {width}, 3)"
    else:
        shapes, wanted = [(height, width), (height, width, 1)], f"({height}, {width}) or ({height}, {width}, 1)"
    if shape not in shapes:
        raise ValueError(f"{path}: array of shape {shape} does not fit its image {image} ({height} x {width}); "
                         f"expected shape {wanted}")
    if key in ("depth", "normals") and dtype.kind != "f":
        unit = "depth in metres (millimetres convert with depth / 1000)" if key == "depth" else "unit normals"
        raise ValueError(f"{path}: dtype {dtype}; expected floating point {unit}")
    if key == "edges" and dtype.kind not in "buif":
        raise ValueError(f"{path}: dtype {dtype}; expected a numeric or boolean edge map with values 0 / 1")


def _check_png_header(path: Path, size: tuple[int, int], image: Path) -> None:
    try:
        with Image.open(path) as label:
            mode, (width, height) = label.mode, label.size
    except OSError as error:
        raise ValueError(f"{path}: cannot be read as a PNG label map ({error})") from error
    if mode not in _PNG_LABEL_MODES:
        raise ValueError(f"{path}: PNG mode {mode}; expected a single-channel class-index PNG (mode L or P) "
                         "with 0 = unlabeled and 1..40 the classes")
    if (height, width) != size:
        raise ValueError(f"{path}: label map of {height} x {width} does not fit its image {image} "
                         f"({size[0]} x {size[1]}); expected the image's size")


def read_sizes(root: Path, ids: Sequence[str], tasks: Sequence[str]) -> list[tuple[int, int]]:
    """The image size ``(H, W)`` of every id, from the headers, after checking that every label's header fits its
    image (PNG mode and size, ``.npy`` shape and dtype).

    Raises:
        ValueError: a header is unreadable or does not fit, naming the file and what was expected.
    """
    sizes = []
    for image_id in ids:
        image = sample_path(root, "image", image_id)
        size = image_size(image)
        for name in tasks:
            path = sample_path(root, name, image_id)
            if name == "semseg":
                _check_png_header(path, size, image)
            else:
                _check_npy_header(path, name, size, image)
        sizes.append(size)
    return sizes


def read_image(path: Path) -> Tensor:
    """An image as a float ``(3, H, W)`` tensor in 0..255."""
    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1).contiguous()


def _load_npy(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """A ``.npy`` label as ``(H, W, channels)``, its shape checked against the image's ``size``."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable NumPy .npy file ({error})") from error
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.shape != (*size, channels):
        raise ValueError(f"{path}: array of shape {array.shape} does not fit its image ({size[0]} x {size[1]}); "
                         f"expected ({size[0]}, {size[1]}, {channels})" + (" or 2-D" if channels == 1 else ""))
    return array


def read_semseg(path: Path, size: tuple[int, int]) -> Tensor:
    """Segmentation PNG -> ``(1, H, W)`` long: 0 (unlabeled) -> 255, class ``k`` in 1..40 -> ``k - 1``."""
    try:
        with Image.open(path) as label:
            raw = np.asarray(label).astype(np.int64)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read as a PNG label map ({error})") from error
    if raw.shape != size:
        raise ValueError(f"{path}: label map of shape {raw.shape} does not fit its image ({size[0]} x {size[1]}); "
                         "expected a single-channel PNG of the image's size")
    bad = np.unique(raw[(raw < 0) | (raw > NUM_CLASSES)])
    if bad.size:
        raise ValueError(f"{path}: class values {bad[:8].tolist()} out of range; expected 0 (unlabeled) or "
                         f"1..{NUM_CLASSES}")
    labels = np.where(raw == 0, IGNORE_INDEX, raw - 1)
    return torch.from_numpy(labels)[None]


def read_depth(path: Path, size: tuple[int, int]) -> Tensor:
    """Depth ``.npy`` -> ``(1, H, W)`` float metres; 0 stays 0 (invalid)."""
    depth = _load_npy(path, size, 1)
    if depth.dtype.kind != "f":
        raise ValueError(f"{path}: dtype {depth.dtype}; expected floating point depth in metres")
    finite = np.isfinite(depth)
    if not finite.all() or (depth < 0).any() or (depth > MAX_DEPTH_M).any():
        values = depth[finite]
        low, high = (values.min(), values.max()) if values.size else (math.nan, math.nan)
        raise ValueError(f"{path}: depth must be finite metres in [0, {MAX_DEPTH_M:g}] (0 = invalid); found "
                         f"{int((~finite).sum())} non-finite values and a finite range [{low:.4g}, {high:.4g}] "
                         "(millimetres convert with depth / 1000)")
    return torch.from_numpy(depth.astype(np.float32)).permute(2, 0, 1).contiguous()


def read_normals(path: Path, size: tuple[int, int], tolerance: float) -> Tensor:
    """Normals ``.npy`` -> ``(3, H, W)`` float; zero vectors stay zero (invalid), the others are rescaled to
    unit length after checking they are unit vectors within ``tolerance``.

    Raises:
        ValueError: a component outside ``[-1 - tolerance, 1 + tolerance]``, a non-zero vector whose length
            is off 1 by more than ``tolerance``, or a non-finite value.
    """
    normals = _load_npy(path, size, 3)
    if normals.dtype.kind != "f":
        raise ValueError(f"{path}: dtype {normals.dtype}; expected floating point unit normals")
    normals = normals.astype(np.float64)
    length = np.linalg.norm(normals, axis=-1)
    valid = length > 0
    off_range = ~np.isfinite(normals) | (np.abs(normals) > 1 + tolerance)
    off_length = valid & ~(np.abs(length - 1) <= tolerance)
    if off_range.any() or off_length.any():
        bad = off_range.any(axis=-1) | off_length
        raise ValueError(
            f"{path}: surface normals must be unit vectors (components in [-1, 1], length 1 within "
            f"{tolerance:g}) or zero vectors (invalid); {int(bad.sum())} pixels are not, with components in "
            f"[{np.nanmin(normals):.4g}, {np.nanmax(normals):.4g}] and lengths in "
            f"[{np.nanmin(length[valid]) if valid.any() else 0:.4g}, {np.nanmax(length):.4g}]. Normals stored "
            "as 0..255 colours map back with 2 * v / 255 - 1; a larger normals_tolerance accepts vectors that "
            "are slightly off unit length"
        )
    normals[valid] /= length[valid, None]
    return torch.from_numpy(normals.astype(np.float32)).permute(2, 0, 1).contiguous()


def read_edges(path: Path, size: tuple[int, int]) -> Tensor:
    """Edge ``.npy`` -> ``(1, H, W)`` float in [0, 1] (binary in the release)."""
    edges = _load_npy(path, size, 1)
    if edges.dtype.kind not in "buif":
        raise ValueError(f"{path}: dtype {edges.dtype}; expected a numeric or boolean edge map with values 0 / 1")
    edges = edges.astype(np.float32)
    bad = ~np.isfinite(edges) | (edges < 0) | (edges > 1)
    if bad.any():
        raise ValueError(f"{path}: edge values must lie in [0, 1] (1 = edge); found {int(bad.sum())} pixels "
                         f"outside, e.g. {np.unique(edges[bad])[:5].tolist()}")
    return torch.from_numpy(edges).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


class NYUv2Dataset(Dataset):
    """The samples of one id list: ``image`` ``(3, H, W)`` float (in [-1, 1] after the transform) and per
    task ``semseg`` ``(H, W)`` long (255 = ignore), ``normals`` ``(3, H, W)``, ``depth`` ``(1, H, W)``,
    ``edges`` ``(1, H, W)`` float (255 where padded).

    Args:
        root: the ``NYUD_MT`` directory.
        ids: sample ids.
        sizes: ``(H, W)`` of each id's image.
        tasks: task names to read, among ``NYU_TASKS``.
        transform: joint transform over the sample dict (``TrainTransform`` / ``EvalTransform``).
        normals_tolerance: allowed deviation of a normal's components and length from the unit range.
    """

    def __init__(self, root: Path, ids: Sequence[str], sizes: Sequence[tuple[int, int]], tasks: Sequence[str],
                 transform: Callable[[dict[str, Tensor]], dict[str, Tensor]], normals_tolerance: float) -> None:
        self.root, self.ids, self.sizes = Path(root), list(ids), list(sizes)
        self.tasks, self.transform, self.normals_tolerance = list(tasks), transform, normals_tolerance

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, index: int) -> dict[str, Tensor]:
        """Sample ``index`` decoded but not transformed (image in 0..255, labels with a channel dimension)."""
        image_id, size = self.ids[index], self.sizes[index]
        image = read_image(sample_path(self.root, "image", image_id))
        if tuple(image.shape[1:]) != size:
            raise ValueError(f"{sample_path(self.root, 'image', image_id)}: image of {image.shape[1]} x "
                             f"{image.shape[2]} differs from the {size[0]} x {size[1]} its header gave at setup")
        sample = {"image": image}
        for name in self.tasks:
            path = sample_path(self.root, name, image_id)
            if name == "semseg":
                sample[name] = read_semseg(path, size)
            elif name == "depth":
                sample[name] = read_depth(path, size)
            elif name == "normals":
                sample[name] = read_normals(path, size, self.normals_tolerance)
            else:
                sample[name] = read_edges(path, size)
        return sample

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.transform(self.read(index))
        if "semseg" in sample:
            sample["semseg"] = sample["semseg"][0]
        return sample
