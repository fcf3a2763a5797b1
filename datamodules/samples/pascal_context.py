"""A tiny fake PASCAL-Context multi-task data set (``PASCAL_MT/``) in the distributed on-disk format.

The files follow docs/datasets.md and the reference loader (ASTMT / Multi-Task-Learning-PyTorch ``pascal_context.py``):
``JPEGImages/<id>.jpg``, ``ImageSets/Context/{train,val}.txt``, ``semseg/VOC12/<id>.png`` or
``semseg/pascal-context/<id>.png`` (palette PNG), ``human_parts/<id>.mat`` (PASCAL-Part struct ``anno``),
``sal_distill/<id>.png`` (grey), ``normals_distill/<id>.png`` (RGB) and ``pascal-context/trainval/<id>.mat``
(``LabelMap``, uint16).

Every label is known: ``fake_sample`` returns the arrays that ``make_pascal_mt`` writes, with the expected
human-parts target stated here independently of the loader's own table. Images cycle through four kinds:

0. a person with parts (plus a person without parts and a dog with parts); semseg in VOC12, with a decoy
   ``semseg/pascal-context`` file that the loader must not read;
1. only a non-person object (a dog whose parts are named like a person's): parts all 255; semseg in
   pascal-context only;
2. a person without part annotations and a bird: parts all 255; semseg in VOC12;
3. no objects at all: parts all 255; semseg in pascal-context.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

TRAIN_IDS = ("2008_000002", "2008_000003", "2008_000007", "2008_000008")
VAL_IDS = ("2008_000009", "2008_000010", "2008_000015", "2008_000016")

# The 7 human-part classes of docs/datasets.md, stated for the fixture's own part names.
PART_TRUTH = {
    "hair": 1, "head": 1, "leye": 1, "mouth": 1,
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "lhand": 4, "rlarm": 4,
    "luleg": 5, "ruleg": 5,
    "lfoot": 6, "rlleg": 6,
}
# LabelMap ids the fixture paints, and whether the NYU-v2 / Context class rule keeps their normals:
# person 284, wall 440 and tvmonitor 427 (the reference's custom addition) are kept; background 0,
# aeroplane 2 and unknown 431 are not.
LABELMAP_IDS = {0: False, 2: False, 284: True, 427: True, 431: False, 440: True}
NORMALS_VALID_IDS = frozenset(k for k, valid in LABELMAP_IDS.items() if valid)

_OBJECT_DTYPE = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
_PART_DTYPE = [("part_name", "O"), ("mask", "O")]


@dataclass
class FakeSample:
    """What ``make_pascal_mt`` writes for one id (arrays before encoding; the JPEG is lossy).

    Attributes:
        image_id: the id.
        kind: which of the four kinds of the module docstring.
        image: ``(H, W, 3)`` uint8 written as JPEG.
        semseg: ``(H, W)`` uint8 palette indices (0..20, 255) of the file the loader must read.
        semseg_dir: ``"VOC12"`` or ``"pascal-context"``.
        parts: ``(H, W)`` uint8, the expected 7-class human-parts target (all 255 without a person).
        saliency: ``(H, W)`` uint8 grey values.
        normals: ``(H, W, 3)`` uint8 RGB values.
        label_map: ``(H, W)`` uint16 PASCAL-Context ``LabelMap``.
        objects: the PASCAL-Part objects struct array written to ``human_parts/<id>.mat``.
    """

    image_id: str
    kind: int
    image: np.ndarray
    semseg: np.ndarray
    semseg_dir: str
    parts: np.ndarray
    saliency: np.ndarray
    normals: np.ndarray
    label_map: np.ndarray
    objects: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.semseg.shape[0], self.semseg.shape[1]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat 768-entry PIL palette."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def write_palette_png(path: Path, indices: np.ndarray) -> None:
    """Write ``(H, W)`` uint8 class indices as a palette (mode ``P``) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = indices.shape
    image = Image.frombytes("P", (w, h), np.ascontiguousarray(indices, dtype=np.uint8).tobytes())
    image.putpalette(voc_palette())
    image.save(path)


def _rect(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def _objects(items: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> np.ndarray:
    objects = np.zeros((1, len(items)), dtype=_OBJECT_DTYPE)
    for i, (name, class_ind, mask, parts) in enumerate(items):
        if parts:
            part_array = np.zeros((1, len(parts)), dtype=_PART_DTYPE)
            for k, (part_name, part_mask) in enumerate(parts):
                part_array[0, k] = (part_name, part_mask.astype(np.uint8))
        else:
            part_array = np.zeros((0, 0))  # how MATLAB stores an object without parts
        objects[0, i] = (name, np.array([[float(class_ind)]]), mask.astype(np.uint8), part_array)
    return objects


def write_parts_mat(path: Path, image_id: str, objects: np.ndarray) -> None:
    """Write the PASCAL-Part struct ``anno`` (fields ``imname``, ``objects``) so that ``loadmat(path)['anno']
    [0][0][1][0]`` is the objects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (image_id, objects)
    scipy.io.savemat(path, {"anno": anno})


def _person_parts(shape: tuple[int, int]) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    h, w = shape
    # Later parts overwrite earlier ones where they overlap (the reference paints in list order).
    parts = [
        ("hair", _rect(shape, 1, w // 4, 4, w // 2)),
        ("head", _rect(shape, 2, w // 4, 7, w // 2)),
        ("leye", _rect(shape, 3, w // 4 + 1, 4, w // 4 + 2)),
        ("mouth", _rect(shape, 5, w // 4 + 2, 6, w // 4 + 4)),
        ("neck", _rect(shape, 7, w // 4 + 2, 9, w // 2 - 2)),
        ("torso", _rect(shape, 9, w // 4, h // 2, w // 2)),
        ("luarm", _rect(shape, 9, w // 4 - 3, 14, w // 4)),
        ("ruarm", _rect(shape, 9, w // 2, 14, w // 2 + 3)),
        ("rlarm", _rect(shape, 14, w // 2, 18, w // 2 + 3)),
        ("lhand", _rect(shape, 14, w // 4 - 3, 17, w // 4)),
        ("luleg", _rect(shape, h // 2, w // 4, h // 2 + 6, w // 4 + 4)),
        ("ruleg", _rect(shape, h // 2, w // 2 - 4, h // 2 + 6, w // 2)),
        ("rlleg", _rect(shape, h // 2 + 6, w // 2 - 4, h - 3, w // 2)),
        ("lfoot", _rect(shape, h - 3, w // 4, h - 1, w // 4 + 5)),
    ]
    person = np.zeros(shape, dtype=np.uint8)
    for _, mask in parts:
        person |= mask
    return person, parts


def fake_sample(image_id: str, index: int, size: tuple[int, int] = (40, 48), seed: int = 0) -> FakeSample:
    """The arrays of the ``index``-th id of a fake data set (kind ``index % 4``, see the module docstring).

    Args:
        image_id: the id.
        index: position of the id in ``train_ids + val_ids``.
        size: ``(H, W)`` of kind-0 images; other kinds differ by a few pixels so sizes vary.
        seed: seed of the random contents.
    """
    kind = index % 4
    h, w = size
    shape = [(h, w), (h - 4, w + 8), (h + 4, w - 8), (h, w)][kind]
    rng = np.random.default_rng([seed, index])
    h, w = shape

    semseg = np.zeros(shape, dtype=np.uint8)
    first, second = (int(c) for c in rng.choice(np.arange(1, 21), size=2, replace=False))
    semseg[h // 4:3 * h // 4, w // 5:w // 2] = 15 if kind in (0, 2) else first
    semseg[h // 3:h - 2, 2 * w // 3:w - 3] = second
    semseg[h // 4 - 1, :] = 255  # an ignored band, as VOC marks object boundaries
    semseg[:, w // 2] = 255
    semseg[-1, :21] = np.arange(21)  # every class index appears in every file
    semseg_dir = "VOC12" if kind in (0, 2) else "pascal-context"

    full = np.ones(shape, dtype=np.uint8)
    parts = np.full(shape, 255, dtype=np.uint8)
    objects: list[tuple[str, int, np.ndarray, list[tuple[str, np.ndarray]]]] = []
    if kind == 0:
        person, person_parts = _person_parts(shape)
        parts = np.zeros(shape, dtype=np.uint8)
        for name, mask in person_parts:
            parts[mask.astype(bool)] = PART_TRUTH[name]
        objects = [
            ("person", 15, person, person_parts),
            ("person", 15, _rect(shape, 0, w - 6, h, w), []),
            ("dog", 12, _rect(shape, h - 8, w - 12, h, w), [("head", _rect(shape, h - 8, w - 12, h - 4, w - 6))]),
        ]
    elif kind == 1:
        objects = [("dog", 12, full, [("head", _rect(shape, 0, 0, h // 2, w // 2)), ("torso", full)])]
    elif kind == 2:
        objects = [("person", 15, _rect(shape, 2, 2, h - 2, w // 2), []), ("bird", 3, _rect(shape, 0, 0, 5, 5), [])]

    saliency = rng.integers(0, 256, size=shape, dtype=np.uint8)
    saliency[0, :4] = [127, 128, 0, 255]  # either side of the 0.5 threshold
    normals = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)

    label_map = np.zeros(shape, dtype=np.uint16)
    label_map[2:h // 2, 3:w // 2] = 284
    label_map[h // 2:h - 4, 3:w // 3] = 440
    label_map[h // 2:h - 4, w // 3:w // 2] = 431
    label_map[4:h - 6, w // 2 + 2:w - 4] = 427
    label_map[6:12, w // 2 + 5:w - 8] = 2

    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    return FakeSample(image_id, kind, image, semseg, semseg_dir, parts, saliency, normals, label_map,
                      _objects(objects))


def _write_common(root: Path, sample: FakeSample, quality: int = 95) -> None:
    image_id = sample.image_id
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=quality, subsampling=0)
    write_palette_png(root / "semseg" / sample.semseg_dir / f"{image_id}.png", sample.semseg)
    write_parts_mat(root / "human_parts" / f"{image_id}.mat", image_id, sample.objects)
    (root / "sal_distill").mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.saliency).save(root / "sal_distill" / f"{image_id}.png")
    (root / "normals_distill").mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample.normals).save(root / "normals_distill" / f"{image_id}.png")
    (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": sample.label_map})


def _write_splits(root: Path, train_ids: tuple[str, ...] | list[str], val_ids: tuple[str, ...] | list[str]) -> None:
    splits = root / "ImageSets" / "Context"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "train.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (splits / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))


def make_pascal_mt(root: Path, train_ids: tuple[str, ...] | list[str] = TRAIN_IDS,
                   val_ids: tuple[str, ...] | list[str] = VAL_IDS, size: tuple[int, int] = (40, 48),
                   seed: int = 0) -> Path:
    """Write a fake ``PASCAL_MT/`` under ``root``.

    Args:
        root: the folder to create ``PASCAL_MT`` in.
        train_ids: ids of ``train.txt``.
        val_ids: ids of ``val.txt``.
        size: ``(H, W)`` of kind-0 images (others differ by up to 8 pixels).
        seed: seed of the random contents.

    Returns:
        The data root ``root / "PASCAL_MT"``. ``fake_sample(id, i, size, seed)`` gives the arrays of the
        ``i``-th id of ``train_ids + val_ids``.
    """
    data = Path(root) / "PASCAL_MT"
    for index, image_id in enumerate([*train_ids, *val_ids]):
        sample = fake_sample(image_id, index, size, seed)
        _write_common(data, sample)
        if sample.kind == 0:
            # A decoy: when both semseg files exist, the loader must read the VOC12 one.
            write_palette_png(data / "semseg" / "pascal-context" / f"{image_id}.png",
                              np.full(sample.size, 7, dtype=np.uint8))
    _write_splits(data, train_ids, val_ids)
    return data


ALIGNED_NORMAL = (200, 100, 50)


def aligned_pattern(index: int, size: tuple[int, int], seed: int = 0, block: int = 8) -> np.ndarray:
    """The ``(H, W)`` {0, 1} block pattern behind the ``index``-th id of ``make_aligned_pascal_mt``."""
    rng = np.random.default_rng([seed, index, 1])
    h, w = size
    blocks = rng.integers(0, 2, size=(-(-h // block), -(-w // block)), dtype=np.uint8)
    blocks[0, 0], blocks[0, -1] = 1, 0  # left-right asymmetric, so a flip of one key alone shows
    return np.kron(blocks, np.ones((block, block), dtype=np.uint8))[:h, :w]


def make_aligned_pascal_mt(root: Path, ids: tuple[str, ...] | list[str] = TRAIN_IDS[:2],
                           size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """Write a fake ``PASCAL_MT/`` whose image encodes its labels, to check that augmentation keeps them aligned.

    Each image has a random pattern of 8x8 blocks ``p`` in {0, 1} (``aligned_pattern``): the image is red 255
    where ``p`` is 1 and 0 elsewhere (green and blue 128); semseg is 15 (person) where ``p`` is 1, else 0; a
    person whose only part, ``head``, covers ``p``; saliency 255 on ``p``; ``LabelMap`` 284 (person, normals
    kept) on ``p`` and 0 elsewhere; normals ``ALIGNED_NORMAL`` everywhere. Both splits list all ``ids``.
    """
    data = Path(root) / "PASCAL_MT"
    for index, image_id in enumerate(ids):
        p = aligned_pattern(index, size, seed)
        image = np.stack([p * 255, np.full_like(p, 128), np.full_like(p, 128)], axis=-1).astype(np.uint8)
        normals = np.broadcast_to(np.array(ALIGNED_NORMAL, dtype=np.uint8), (*size, 3)).copy()
        sample = FakeSample(image_id, 0, image, p * 15, "VOC12", p.copy(), p * 255, normals, p.astype(np.uint16) * 284,
                            _objects([("person", 15, p, [("head", p)])]))
        _write_common(data, sample, quality=100)
    _write_splits(data, ids, ids)
    return data


DEFECTS = (
    "missing_image", "missing_semseg", "missing_parts", "missing_saliency", "missing_normals", "missing_labelmap",
    "unreadable_image", "labelmap_without_key", "labelmap_float", "labelmap_wrong_size", "semseg_wrong_size",
    "semseg_out_of_range", "semseg_rgb", "saliency_rgb", "normals_grey", "parts_without_anno",
    "parts_unknown_name", "parts_wrong_size", "parts_not_a_struct", "unreadable_mat",
)


def break_pascal_mt(data: Path, image_id: str, defect: str) -> Path:
    """Damage one file of a fake data set written by ``make_pascal_mt``.

    Args:
        data: the data root returned by ``make_pascal_mt``.
        image_id: whose file to damage.
        defect: one of ``DEFECTS``: ``missing_*`` deletes a file; the others rewrite it malformed.

    Returns:
        The path of the damaged (or deleted) file.
    """
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; choose one of {DEFECTS}")
    image = data / "JPEGImages" / f"{image_id}.jpg"
    voc, context = (data / "semseg" / d / f"{image_id}.png" for d in ("VOC12", "pascal-context"))
    semseg = voc if voc.exists() else context
    parts = data / "human_parts" / f"{image_id}.mat"
    saliency = data / "sal_distill" / f"{image_id}.png"
    normals = data / "normals_distill" / f"{image_id}.png"
    label_map = data / "pascal-context" / "trainval" / f"{image_id}.mat"
    if defect.startswith("missing_"):
        target = {"image": image, "semseg": semseg, "parts": parts, "saliency": saliency, "normals": normals,
                  "labelmap": label_map}[defect.removeprefix("missing_")]
        if defect == "missing_semseg":
            voc.unlink(missing_ok=True)
            context.unlink(missing_ok=True)
        else:
            target.unlink()
        return target
    with Image.open(image) as im:
        w, h = im.size
    if defect == "unreadable_image":
        image.write_bytes(b"\xff\xd8 this is not a JPEG")
        return image
    if defect == "labelmap_without_key":
        scipy.io.savemat(label_map, {"Labels": np.zeros((h, w), dtype=np.uint16)})
        return label_map
    if defect == "labelmap_float":
        scipy.io.savemat(label_map, {"LabelMap": np.full((h, w), 0.5)})
        return label_map
    if defect == "labelmap_wrong_size":
        scipy.io.savemat(label_map, {"LabelMap": np.zeros((h + 1, w), dtype=np.uint16)})
        return label_map
    if defect == "semseg_wrong_size":
        write_palette_png(semseg, np.zeros((h, w + 3), dtype=np.uint8))
        return semseg
    if defect == "semseg_out_of_range":
        write_palette_png(semseg, np.full((h, w), 21, dtype=np.uint8))
        return semseg
    if defect == "semseg_rgb":
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(semseg)
        return semseg
    if defect == "saliency_rgb":
        Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(saliency)
        return saliency
    if defect == "normals_grey":
        Image.fromarray(np.zeros((h, w), dtype=np.uint8)).save(normals)
        return normals
    if defect == "parts_without_anno":
        scipy.io.savemat(parts, {"something": np.zeros(3)})
        return parts
    if defect == "parts_unknown_name":
        mask = np.ones((h, w), dtype=np.uint8)
        write_parts_mat(parts, image_id, _objects([("person", 15, mask, [("tail", mask)])]))
        return parts
    if defect == "parts_wrong_size":
        mask = np.ones((h + 2, w), dtype=np.uint8)
        write_parts_mat(parts, image_id, _objects([("person", 15, mask, [("head", mask)])]))
        return parts
    if defect == "parts_not_a_struct":
        scipy.io.savemat(parts, {"anno": np.zeros((2, 2))})
        return parts
    shutil.copyfile(image, parts)  # unreadable_mat: a JPEG where a .mat should be
    return parts

