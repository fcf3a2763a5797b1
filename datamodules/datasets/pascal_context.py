"""The PASCAL-Context multi-task data set (``PASCAL_MT/``, the ASTMT release) read as distributed: layout,
decoding and the ``Dataset`` of one split (the data module is ``datamodules.pascal_context.PascalContext``).

Five dense tasks, any subset in any order: ``semseg`` (21 VOC classes), ``parts`` (7 human-part classes),
``saliency``, ``normals`` and ``edges``. Targets follow ``dymu.tasks``: semseg and parts ``(H, W)`` long,
saliency and edges ``(1, H, W)`` float in {0, 1}, normals ``(3, H, W)`` float; 255 (label maps) and the zero
vector (normals) are ignored, and padding uses them.

Decoding, checked against the reference loader (Vandenhende's Multi-Task-Learning-PyTorch
``data/pascal_context.py``, taken from facebookresearch/astmt, and its ``custom_transforms.py``):

- semseg: ``semseg/VOC12/<id>.png`` when it exists, else ``semseg/pascal-context/<id>.png``; palette indices
  0..20, 255 ignored.
- parts: ``human_parts/<id>.mat`` holds the PASCAL-Part struct ``anno``; ``anno[0][0][1][0]`` are the
  objects, ``obj[1][0][0]`` the class (15 = person), ``obj[3][0][k]`` = (part name, part mask); an object
  without parts stores an empty ``obj[3]``. The reference's 6-part grouping (``HUMAN_PART[6]``) maps the 24
  person part names to head, torso/neck, upper arms, lower arms/hands, upper legs, lower legs/feet; pixels
  outside every person part are background 0, later parts overwrite earlier ones. The reference requires
  the .mat for every listed id, so a missing one is an error here too. Where no part pixel is set (no
  person, or persons without part annotations) the whole target is 255, as the reference's
  ``AddIgnoreRegions`` does; we decide this on the full image before cropping (the reference does it after
  its resize, where it has no crop), so a crop of a person image that shows no part keeps its background.
- saliency: ``sal_distill/<id>.png`` grey, target ``value / 255 > 0.5``.
- normals: ``normals_distill/<id>.png`` RGB, target ``2 * value / 255 - 1``. With ``normals_mask=
  "nyu_context"`` (default, the reference's rule) a pixel is kept only if its ``LabelMap`` class is one of
  ``NORMALS_VALID_CLASSES``, others are set to the zero vector (invalid). The reference computes that set
  at run time from two JSON class lists shipped with its *code* (``data/db_info/nyu_classes.json``, 894
  NYU-v2 names, and ``context_classes.json``, 459 Context names to ``LabelMap`` ids) as the Context ids of
  the names in both lists except ``unknown``, plus ``tvmonitor``: 170 ids. They are not part of
  ``PASCAL_MT/``, so the ids are stored here and no JSON is read. ``normals_mask="none"`` keeps every pixel.
- edges: ``pascal-context/trainval/<id>.mat``, ``LabelMap`` (uint16); the edge map is
  ``thin(|Laplacian(LabelMap)| > 0)`` with OpenCV's 3x3 Laplacian (``ksize=1``: ``[[0,1,0],[1,-4,1],[0,1,0]]``,
  border reflect-101), computed here with ``scipy.ndimage.convolve(mode="mirror")``, the same filter.

Splits: train = ``ImageSets/Context/train.txt``; val and test = ``val.txt`` (the paper evaluates on val).
Every label must have its image's size (the reference silently resizes mismatches; we report them).
Nothing is written into the data directory: the reference's parts cache ``ImageSets/Parts/<split>.txt`` is
not needed, since whether an image has person parts is read from its .mat when it is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import scipy.ndimage
import torch
from PIL import Image
from skimage.morphology import thin
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.datasets.files import DiskLayout, read_rgb
from datamodules.transforms import EvalTransform, TrainTransform
from dymu.tasks import IGNORE_INDEX

TASK_NAMES = ("semseg", "parts", "saliency", "normals", "edges")
NORMALS_MASKS = ("nyu_context", "none")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PART_CLASSES = ("background", "head", "torso", "upper_arms", "lower_arms", "upper_legs", "lower_legs")
PERSON_CLASS = 15
HUMAN_PART_CLASS = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("lhand", "rhand", "llarm", "rlarm"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("lfoot", "rfoot", "llleg", "rlleg"), 6),
}
NORMALS_VALID_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55,
    56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115,
    122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195,
    197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251,
    252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295,
    304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423,
    427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))
KINDS = {"image": "image", "semseg": "label", "parts": "label", "saliency": "label", "edges": "label",
         "normals": "normals"}
_LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])

_FILES = {
    "image": (("JPEGImages", ".jpg"),),
    "semseg": (("semseg/VOC12", ".png"), ("semseg/pascal-context", ".png")),
    "parts": (("human_parts", ".mat"),),
    "saliency": (("sal_distill", ".png"),),
    "normals": (("normals_distill", ".png"),),
    "label_map": (("pascal-context/trainval", ".mat"),),
}
LAYOUT = DiskLayout(
    dataset="PASCAL-Context",
    lines=(
        "JPEGImages/<id>.jpg",
        "ImageSets/Context/train.txt, val.txt (one id per line)",
        "semseg/VOC12/<id>.png or semseg/pascal-context/<id>.png (semseg; palette indices 0..20, 255)",
        "human_parts/<id>.mat (parts; PASCAL-Part struct 'anno')",
        "sal_distill/<id>.png (saliency; grey)",
        "normals_distill/<id>.png (normals; RGB)",
        "pascal-context/trainval/<id>.mat (edges, and the normals' class mask; variable 'LabelMap')",
    ),
    source=("Get PASCAL_MT.tgz (the ASTMT / Multi-Task-Learning-PyTorch release, "
            "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz), extract it and pass the extracted "
            "PASCAL_MT folder as root."),
    files=_FILES,
    # The paper evaluates on val: val and test share val.txt.
    split_lists={"train": "ImageSets/Context/train.txt", "val": "ImageSets/Context/val.txt",
                 "test": "ImageSets/Context/val.txt"},
)


def file_roles(tasks: Sequence[str], normals_mask: str) -> list[str]:
    """The file roles (keys of ``LAYOUT.files``) one sample of ``tasks`` needs: ``image``, each task's file and
    ``label_map`` for edges or for normals masked by ``"nyu_context"``."""
    needs_label_map = "edges" in tasks or ("normals" in tasks and normals_mask == "nyu_context")
    return [role for role in _FILES if role == "image" or role in tasks or (role == "label_map" and needs_label_map)]


def _read_png(path: Path, expected: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the image ({error}); expected {expected}") from error


def _read_mat(path: Path) -> dict[str, Any]:
    try:
        return scipy.io.loadmat(path)
    except Exception as error:  # scipy raises many types for a damaged or foreign file
        raise ValueError(f"{path}: cannot read it as a MATLAB .mat file ({error})") from error


def _check_size(array: np.ndarray, path: Path, size: tuple[int, int]) -> None:
    if tuple(array.shape[:2]) != size:
        raise ValueError(f"{path}: label of size {array.shape[0]}x{array.shape[1]}, but its image is "
                         f"{size[0]}x{size[1]}; every label must have its image's size")


def _check_uint8(array: np.ndarray, path: Path, channels: int, expected: str) -> None:
    shape_ok = array.ndim == 2 if channels == 1 else array.ndim == 3 and array.shape[2] == channels
    if not shape_ok or array.dtype != np.uint8:
        raise ValueError(f"{path}: expected {expected}; got an array of shape {array.shape} and dtype {array.dtype}")


def load_semseg(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Semantic labels of a palette PNG: ``(H, W)`` uint8, 0..20 and 255 (ignore).

    Raises:
        ValueError: the file is unreadable, not single-channel 8-bit, of another size than ``size``, or holds
            an index outside 0..20 and 255.
    """
    labels = _read_png(path, "a palette PNG of class indices")
    _check_uint8(labels, path, 1, "a palette (or grey) PNG of class indices, (H, W) 8-bit")
    _check_size(labels, path, size)
    bad = np.setdiff1d(np.unique(labels), [*range(len(VOC_CLASSES)), IGNORE_INDEX])
    if bad.size:
        raise ValueError(f"{path}: class indices must be 0..{len(VOC_CLASSES) - 1} or {IGNORE_INDEX} (ignore); "
                         f"found {bad[:10].tolist()}")
    return labels


_PART_STRUCT = ("the PASCAL-Part struct 'anno' with anno[0][0][1][0] = objects, obj[1][0][0] = class, "
                "obj[3][0][k] = (part name, part mask)")


def load_parts(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The 7-class human-parts target of a PASCAL-Part .mat: ``(H, W)`` uint8, all 255 without any person part.

    Raises:
        ValueError: the file is unreadable, lacks ``anno`` or its structure, names an unknown person part,
            or has a part mask of another size than ``size``.
    """
    mat = _read_mat(path)
    if "anno" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable 'anno' (found {found}); expected {_PART_STRUCT}")
    target = np.zeros(size, dtype=np.uint8)
    try:
        objects = mat["anno"][0][0][1][0]
        for obj in objects:
            parts = np.asarray(obj[3])
            if int(np.asarray(obj[1]).ravel()[0]) != PERSON_CLASS or parts.size == 0:
                continue
            for part in parts.ravel():
                name, mask = str(np.asarray(part[0]).ravel()[0]), np.asarray(part[1])
                if name not in HUMAN_PART_CLASS:
                    raise ValueError(f"{path}: unknown person part {name!r}; expected one of "
                                     f"{sorted(HUMAN_PART_CLASS)}")
                if mask.shape != size:
                    raise ValueError(f"{path}: mask of part {name!r} is {mask.shape[0]}x{mask.shape[1]} "
                                     f"but its image is {size[0]}x{size[1]}")
                target[mask.astype(bool)] = HUMAN_PART_CLASS[name]
    except (IndexError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"{path}: unexpected structure ({error}); expected {_PART_STRUCT}") from error
    if not target.any():
        target[:] = IGNORE_INDEX
    return target


def load_label_map(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PASCAL-Context ``LabelMap`` of a .mat file: ``(H, W)`` integer class ids.

    Raises:
        ValueError: the file is unreadable, has no ``LabelMap``, or it is not a 2-D integer array of ``size``.
    """
    mat = _read_mat(path)
    if "LabelMap" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable 'LabelMap' (found {found}); expected the PASCAL-Context label map, "
                         "(H, W) uint16")
    label_map = mat["LabelMap"]
    if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"{path}: 'LabelMap' must be a 2-D integer (uint16) array; got shape {label_map.shape} "
                         f"and dtype {label_map.dtype}")
    _check_size(label_map, path, size)
    return label_map


def edge_map(label_map: np.ndarray) -> np.ndarray:
    """Edges of a label map: ``thin(|Laplacian| > 0)`` as float32 {0, 1}, as the reference computes them.

    Args:
        label_map: ``(H, W)`` integer class ids.
    """
    laplacian = scipy.ndimage.convolve(label_map.astype(np.float64), _LAPLACIAN, mode="mirror")
    return thin(np.abs(laplacian) > 0).astype(np.float32)


def load_saliency(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Binary saliency of a grey PNG: ``value / 255 > 0.5`` as float32 {0, 1}, ``(H, W)``.

    Raises:
        ValueError: the file is unreadable, not a grey 8-bit PNG, or of another size than ``size``.
    """
    grey = _read_png(path, "a grey PNG")
    _check_uint8(grey, path, 1, "a grey 8-bit PNG, (H, W)")
    _check_size(grey, path, size)
    return (grey.astype(np.float32) / 255.0 > 0.5).astype(np.float32)


def load_normals(path: Path, size: tuple[int, int], label_map: np.ndarray | None) -> np.ndarray:
    """Normals of an RGB PNG: ``2 * value / 255 - 1``, ``(H, W, 3)`` float32; where ``label_map`` is given,
    pixels whose class is not in ``NORMALS_VALID_CLASSES`` become the zero vector (invalid).

    Raises:
        ValueError: the file is unreadable, not an RGB 8-bit PNG, or of another size than ``size``.
    """
    rgb = _read_png(path, "an RGB PNG")
    _check_uint8(rgb, path, 3, "an RGB 8-bit PNG, (H, W, 3)")
    _check_size(rgb, path, size)
    normals = 2.0 * rgb.astype(np.float32) / 255.0 - 1.0
    if label_map is not None:
        normals[~np.isin(label_map, list(NORMALS_VALID_CLASSES))] = 0.0
    return normals


class PascalContextDataset(Dataset):
    """The samples of one split: ``{"image": (3, H, W), <task>: target}`` after ``transform``.

    Args:
        root: the ``PASCAL_MT`` folder.
        ids: image ids, in order.
        tasks: task names (a subset of ``TASK_NAMES``).
        transform: joint transform over the sample dict (``TrainTransform`` or ``EvalTransform``).
        normals_mask: ``"nyu_context"`` or ``"none"`` (see the module docstring).
    """

    def __init__(self, root: Path, ids: Sequence[str], tasks: Sequence[str],
                 transform: TrainTransform | EvalTransform, normals_mask: str = "nyu_context") -> None:
        self.root, self.ids, self.task_names = Path(root), list(ids), list(tasks)
        self.transform, self.normals_mask = transform, normals_mask

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> dict[str, np.ndarray]:
        """The decoded arrays of one sample before the transform: ``image`` ``(H, W, 3)`` float32 0..255 and
        each task's target, channel-last (``(H, W)`` or ``(H, W, 3)``)."""
        image_id = self.ids[index]
        paths = {role: LAYOUT.sample_path(self.root, role, image_id)
                 for role in file_roles(self.task_names, self.normals_mask)}
        image = read_rgb(paths["image"])
        size = (image.shape[0], image.shape[1])
        label_map = load_label_map(paths["label_map"], size) if "label_map" in paths else None
        arrays = {"image": image}
        for name in self.task_names:
            if name == "semseg":
                arrays[name] = load_semseg(paths[name], size)
            elif name == "parts":
                arrays[name] = load_parts(paths[name], size)
            elif name == "saliency":
                arrays[name] = load_saliency(paths[name], size)
            elif name == "normals":
                mask = label_map if self.normals_mask == "nyu_context" else None
                arrays[name] = load_normals(paths[name], size, mask)
            else:
                arrays[name] = edge_map(label_map)  # type: ignore[arg-type]
        return arrays

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = {}
        for key, array in self.load(index).items():
            tensor = torch.from_numpy(array)
            sample[key] = tensor.permute(2, 0, 1).contiguous() if tensor.ndim == 3 else tensor[None]
        sample = self.transform(sample)
        for name in ("semseg", "parts"):
            if name in sample:
                sample[name] = sample[name][0].long()
        return sample
