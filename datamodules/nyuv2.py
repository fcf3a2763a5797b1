"""NYU-v2 multi-task data: semantic segmentation (40 classes), surface normals, depth and edges, read from
the ``NYUD_MT`` release as it is distributed (the ASTMT / Multi-Task-Learning-PyTorch layout).

Decoding follows that release's reference loader (``data/nyud.py``): the segmentation PNG holds 0 for
unlabeled pixels (-> 255, ignored) and 1..40 for the classes (-> 0..39); depth ``.npy`` files hold metres
with 0 for invalid pixels; normals ``.npy`` files hold ``(H, W, 3)`` vectors with the zero vector for invalid
pixels; edge ``.npy`` files hold a binary map. Where the reference loader silently resizes a label whose
size differs from its image, this one refuses the file: a label of another size is a different data set.

Nothing is ever written into the data directory. Cheap checks (the root, the split lists, that every listed
id has its files, file headers: image sizes, PNG modes, ``.npy`` shapes and dtypes) run when a split is
built, so a broken data set fails at ``setup``; value checks (class range, normals' range, depth sign) run
when a sample is read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import FileDataModule
from datamodules.errors import DatasetNotFoundError
from datamodules.transforms import PAPER_SCALES, EvalTransform, TrainTransform
from dymu.tasks import IGNORE_INDEX, make_task

NYU_TASKS = ("semseg", "normals", "depth", "edges")
NUM_CLASSES = 40
DEFAULT_TASKS = ("semseg", "normals", "depth")
DEFAULT_SCALES: dict[str, float] = {"semseg": 1.0, "normals": 10.0, "depth": 3.0, "edges": 50.0}
EDGE_POS_WEIGHT = 0.8
# NYU-v2's Kinect reaches about 10 m; larger values mean another unit (millimetres), not a far wall.
MAX_DEPTH_M = 100.0

# Split -> list file under gt_sets/ (the release has no separate test list: test is val, as in DYMU).
SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "val.txt"}
# Sample key -> (folder, extension) under the root.
FILES = {
    "image": ("images", ".jpg"),
    "semseg": ("segmentation", ".png"),
    "depth": ("depth", ".npy"),
    "normals": ("normals", ".npy"),
    "edges": ("edge", ".npy"),
}
# Sample key -> transform kind (datamodules.transforms).
KINDS = {"image": "image", "semseg": "label", "edges": "label", "normals": "normals", "depth": "depth"}
_PNG_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")

LAYOUT = """\
  images/<id>.jpg          RGB image (480 x 640)
  segmentation/<id>.png    single-channel class index: 0 unlabeled, 1..40 the NYU-40 classes
  depth/<id>.npy           float (H, W) depth in metres, 0 = invalid
  normals/<id>.npy         float (H, W, 3) unit normals, zero vector = invalid
  edge/<id>.npy            (H, W) edge map with values 0 / 1
  gt_sets/train.txt        training ids, one per line
  gt_sets/val.txt          validation (and test) ids, one per line
Only the folders of the configured tasks are needed."""
SOURCE = (
    "Get NYUD_MT.tgz, the multi-task NYU-v2 release of ASTMT / Multi-Task-Learning-PyTorch "
    "(https://drive.google.com/file/d/14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw), extract it and pass the extracted "
    "NYUD_MT directory as root."
)


def _not_found(root: Path, missing: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError("NYU-v2", root, missing, LAYOUT, SOURCE)


def sample_path(root: Path, key: str, image_id: str) -> Path:
    """Path of one file of the data set.

    Args:
        root: the ``NYUD_MT`` directory.
        key: ``image`` or a task name (``semseg``, ``normals``, ``depth``, ``edges``).
        image_id: an id from a ``gt_sets`` list.
    """
    folder, extension = FILES[key]
    return root / folder / f"{image_id}{extension}"


# ----------------------------------------------------------------------------------------------------------
# Headers (read at setup) and contents (read per sample)
# ----------------------------------------------------------------------------------------------------------


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image from its header only.

    Raises:
        ValueError: the file is not an image PIL can identify.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as error:
        raise ValueError(f"{path}: cannot be read as an image ({error}); expected an RGB JPEG") from error
    return height, width


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


def read_image(path: Path) -> Tensor:
    """An image as a float ``(3, H, W)`` tensor in 0..255."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read as an image ({error}); expected an RGB JPEG") from error
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


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
# Dataset and data module
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


class NYUv2(FileDataModule):
    """NYU-v2 multi-task (the ``NYUD_MT`` release; layout in ``LAYOUT``): 40-class semantic segmentation,
    surface normals, depth and edges.

    Splits: ``train`` = ``gt_sets/train.txt``; ``val`` and ``test`` = ``gt_sets/val.txt`` (the release has
    no other held-out list). Training samples get the BMTAS augmentation (``TrainTransform``: random scale
    from ``augment_scales``, random crop to ``crop_size`` after padding, horizontal flip that negates the
    normals' x; depth values are resampled by nearest neighbour and never rescaled, where the
    Multi-Task-Learning-PyTorch NYUD transform divides depth by the scale factor). Validation and test samples
    are padded to ``crop_size`` (``EvalTransform``), never resized or cropped.

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
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        names = list(DEFAULT_TASKS if tasks is None else tasks)
        unknown = [name for name in names if name not in NYU_TASKS]
        if unknown or not names or len(set(names)) != len(names):
            raise ValueError(f"tasks {names} must be 1 to 4 distinct names of {list(NYU_TASKS)}"
                             + (f"; unknown: {unknown}" if unknown else ""))
        if len(crop_size) != 2 or any(int(s) != s or s < 1 for s in crop_size):
            raise ValueError(f"crop_size must be two positive integers (H, W), got {list(crop_size)}")
        scales = dict(scales or {})
        extra = sorted(set(scales) - set(names))
        if extra:
            raise ValueError(f"scales name task(s) {extra} that are not configured; configured: {names}")
        for name, value in scales.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"scale of task {name!r} must be a positive finite number, got {value}")
        if not augment_scales or any(not math.isfinite(s) or s <= 0 for s in augment_scales):
            raise ValueError(f"augment_scales must be positive numbers, got {list(augment_scales)}")
        if not 0 < edge_pos_weight < 1:
            raise ValueError(f"edge_pos_weight must lie strictly between 0 and 1, got {edge_pos_weight}")
        if not 0 <= normals_tolerance < 1:
            raise ValueError(f"normals_tolerance must lie in [0, 1), got {normals_tolerance}")
        self.root = Path(root)
        self._names = names
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.augment_scales = [float(s) for s in augment_scales]
        self.normals_tolerance = float(normals_tolerance)
        all_scales = {**DEFAULT_SCALES, **scales}
        self._tasks = [
            make_task("semseg", out_channels=NUM_CLASSES, scale=all_scales[name]) if name == "semseg"
            else make_task("edges", scale=all_scales[name], pos_weight=edge_pos_weight) if name == "edges"
            else make_task(name, scale=all_scales[name])
            for name in names
        ]
        self._lists: dict[str, tuple[list[str], list[tuple[int, int]]]] = {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(3, *crop_size)``."""
        return (3, *self.crop_size)

    def _index(self, list_name: str) -> tuple[list[str], list[tuple[int, int]]]:
        """Ids of ``gt_sets/<list_name>`` and their image sizes, after checking that every file the
        configured tasks need is there and that its header fits its image."""
        if list_name in self._lists:
            return self._lists[list_name]
        if not self.root.is_dir():
            raise _not_found(self.root, self.root)
        list_path = self.root / "gt_sets" / list_name
        if not list_path.is_file():
            raise _not_found(self.root, list_path)
        ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"{list_path}: lists no ids; expected one sample id per line")
        duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
        if duplicates:
            raise ValueError(f"{list_path}: ids listed more than once: {duplicates[:8]}; every sample must be "
                             "listed once (metrics would count it twice)")
        keys = ["image", *self._names]
        for key in keys:
            folder = self.root / FILES[key][0]
            if not folder.is_dir():
                raise _not_found(self.root, folder)
        for image_id in ids:
            for key in keys:
                path = sample_path(self.root, key, image_id)
                if not path.is_file():
                    raise _not_found(self.root, path)
        sizes = []
        for image_id in ids:
            image = sample_path(self.root, "image", image_id)
            size = image_size(image)
            for name in self._names:
                path = sample_path(self.root, name, image_id)
                if name == "semseg":
                    _check_png_header(path, size, image)
                else:
                    _check_npy_header(path, name, size, image)
            sizes.append(size)
        self._lists[list_name] = (ids, sizes)
        return ids, sizes

    def make_dataset(self, split: str, train: bool) -> NYUv2Dataset:
        """The dataset of ``split`` with the training augmentation when ``train`` is true and the padding
        evaluation transform otherwise.

        Raises:
            DatasetNotFoundError: the root, the split's list or a file of a listed id is missing.
            ValueError: a file's header does not fit (size, shape, dtype, PNG mode), the training list holds
                fewer ids than ``batch_size``, or (evaluation) an image is larger than ``crop_size``.
        """
        list_name = SPLIT_FILES[split]
        ids, sizes = self._index(list_name)
        kinds = {key: KINDS[key] for key in ("image", *self._names)}
        if train:
            if split == "train" and len(ids) < self.batch_size:
                raise ValueError(f"{self.root / 'gt_sets' / list_name} lists {len(ids)} ids, fewer than batch_size "
                                 f"({self.batch_size}): the train loader drops the last incomplete batch, so no "
                                 "batch would remain")
            transform: Callable = TrainTransform(kinds, self.crop_size, self.augment_scales)
        else:
            height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
            if height > self.crop_size[0] or width > self.crop_size[1]:
                big = next(i for i, s in zip(ids, sizes) if s[0] > self.crop_size[0] or s[1] > self.crop_size[1])
                raise ValueError(f"{self.root / 'gt_sets' / list_name} lists images up to {height} x {width} (e.g. "
                                 f"{sample_path(self.root, 'image', big)}), larger than crop_size "
                                 f"{self.crop_size[0]} x {self.crop_size[1]}: evaluation pads to crop_size and "
                                 f"never crops; set crop_size to at least [{height}, {width}]")
            transform = EvalTransform(kinds, self.crop_size)
        return NYUv2Dataset(self.root, ids, sizes, self._names, transform, self.normals_tolerance)
