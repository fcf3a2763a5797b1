"""A tiny fake NYU-v2 multi-task set in the real on-disk format: ``NYUD_MT/``.

The layout and encodings are those the ASTMT / Multi-Task-Learning-PyTorch loader (``data/nyud.py``) reads:

- ``images/<id>.jpg``: RGB JPEG.
- ``segmentation/<id>.png``: single-channel class index, 0 = unlabeled, 1..40 = the 40 NYU classes.
- ``depth/<id>.npy``: float32 ``(H, W)`` depth in metres, 0 = invalid.
- ``normals/<id>.npy``: float32 ``(H, W, 3)`` unit normals (components in [-1, 1]), zero vector = invalid.
- ``edge/<id>.npy``: float32 ``(H, W)`` binary edge map in {0, 1}.
- ``gt_sets/train.txt``, ``gt_sets/val.txt``: one id per line.

The content is chosen so tests can check decoding and augmentation exactly: the image's red channel is a
ramp over the columns and its green channel a ramp over the rows; the depth is column-coded
(``0.5 + 0.25 * x`` metres) and the segmentation row-coded (``1 + 39 * y // (H - 1)``, injective while
``H <= 40``), so a pixel of any augmented sample can be traced back to its source column and row through
the image as well as through the labels. The unlabeled class (0) covers the last column; invalid depth,
invalid normals and edges sit at random pixels drawn from ``seed``. Use ``nyud_file`` to find (and corrupt)
one file and ``read_raw`` to read back what was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_TRAIN_IDS = ("0001", "0002", "0003", "0004")
DEFAULT_VAL_IDS = ("0005", "0006", "0007")
DEFAULT_SIZE = (24, 32)

# What -> (folder, extension) under ``NYUD_MT/``.
FILES = {
    "image": ("images", ".jpg"),
    "semseg": ("segmentation", ".png"),
    "depth": ("depth", ".npy"),
    "normals": ("normals", ".npy"),
    "edges": ("edge", ".npy"),
}


def nyud_file(root: Path, what: str, image_id: str) -> Path:
    """Path of one file of a generated set.

    Args:
        root: the ``NYUD_MT`` directory ``make_nyud_mt`` returned.
        what: ``image``, ``semseg``, ``depth``, ``normals`` or ``edges``.
        image_id: the sample's id.
    """
    folder, extension = FILES[what]
    return Path(root) / folder / f"{image_id}{extension}"


def fake_sample(index: int, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0) -> dict[str, np.ndarray]:
    """The raw arrays of sample ``index`` as they are written (the image before JPEG compression).

    Args:
        index: position of the sample among all generated ids (train first, then val).
        size: (H, W).
        seed: seed of the random parts (invalid pixels, normals, edges, the image's blue channel).

    Returns:
        ``image`` uint8 ``(H, W, 3)``, ``semseg`` uint8 ``(H, W)`` raw labels 0..40, ``depth`` float32
        ``(H, W)``, ``normals`` float32 ``(H, W, 3)``, ``edges`` float32 ``(H, W)``.
    """
    height, width = size
    if height < 2 or width < 2:
        raise ValueError(f"size must be at least 2 x 2, got {size}")
    rng = np.random.default_rng([seed, index])
    y, x = np.mgrid[0:height, 0:width]

    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.round(255 * x / (width - 1))
    image[..., 1] = np.round(255 * y / (height - 1))
    image[..., 2] = rng.integers(0, 256)

    semseg = (1 + 39 * y // (height - 1)).astype(np.uint8)
    semseg[:, -1] = 0

    depth = (0.5 + 0.25 * x).astype(np.float32)
    depth[rng.random((height, width)) < 0.15] = 0.0

    normals = rng.normal(size=(height, width, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[rng.random((height, width)) < 0.15] = 0.0

    edges = (rng.random((height, width)) < 0.2).astype(np.float32)
    return {"image": image, "semseg": semseg, "depth": depth, "normals": normals.astype(np.float32),
            "edges": edges}


def make_nyud_mt(root: Path, train_ids: Sequence[str] = DEFAULT_TRAIN_IDS, val_ids: Sequence[str] = DEFAULT_VAL_IDS,
                 size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0) -> Path:
    """Write a tiny fake ``NYUD_MT/`` under ``root`` (see the module docstring) and return its path.

    Args:
        root: parent directory; ``root / "NYUD_MT"`` is created.
        train_ids: ids listed in ``gt_sets/train.txt``.
        val_ids: ids listed in ``gt_sets/val.txt``.
        size: (H, W) of every image and label.
        seed: seed of the random parts of the labels (``fake_sample``).
    """
    data_root = Path(root) / "NYUD_MT"
    for folder, _ in FILES.values():
        (data_root / folder).mkdir(parents=True, exist_ok=True)
    (data_root / "gt_sets").mkdir(exist_ok=True)
    for index, image_id in enumerate([*train_ids, *val_ids]):
        sample = fake_sample(index, size, seed)
        # 4:4:4 chroma keeps the colour ramps accurate to about a level (the default 4:2:0 halves their resolution).
        Image.fromarray(sample["image"]).save(nyud_file(data_root, "image", image_id), quality=95, subsampling=0)
        Image.fromarray(sample["semseg"]).save(nyud_file(data_root, "semseg", image_id))
        for what in ("depth", "normals", "edges"):
            np.save(nyud_file(data_root, what, image_id), sample[what])
    for split, ids in (("train", train_ids), ("val", val_ids)):
        (data_root / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return data_root


def read_raw(root: Path, image_id: str) -> dict[str, np.ndarray]:
    """Read back the files of one sample exactly as stored (the image as decoded from the JPEG).

    Args:
        root: the ``NYUD_MT`` directory.
        image_id: the sample's id.
    """
    with Image.open(nyud_file(root, "image", image_id)) as image:
        rgb = np.asarray(image.convert("RGB"))
    with Image.open(nyud_file(root, "semseg", image_id)) as label:
        semseg = np.asarray(label)
    arrays = {what: np.load(nyud_file(root, what, image_id)) for what in ("depth", "normals", "edges")}
    return {"image": rgb, "semseg": semseg, **arrays}
