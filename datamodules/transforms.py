"""Joint augmentation of an image and its dense labels (BMTAS appendix A; docs/datasets.md).

A sample is a dict of tensors with a channel dimension: ``image`` ``(3, H, W)`` float in 0..255, and per
task a target ``(C, H, W)``. How a key is resampled and padded depends on its *kind*:

| kind     | resize   | pad fill | flip          |
|----------|----------|----------|---------------|
| image    | bilinear | 127.5    | mirror        |
| label    | nearest  | 255      | mirror        |
| normals  | nearest  | 0        | mirror, x * -1|
| depth    | nearest  | 0        | mirror        |

"nearest" is torch's ``nearest-exact`` (pixel centres, as bilinear with ``align_corners=False``); torch's
plain ``nearest`` is shifted by up to half a source pixel against the image. Normals and depth use nearest
resampling so that invalid pixels (zero vector, zero depth) never blend
into valid ones; a scale changes neither the direction of a normal nor a depth value. The image is mapped
to [-1, 1] last (``normalize_image``), so its padding becomes 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.tasks import IGNORE_INDEX

KIND_FILL = {"image": 127.5, "label": float(IGNORE_INDEX), "normals": 0.0, "depth": 0.0}
KIND_MODE = {"image": "bilinear", "label": "nearest-exact", "normals": "nearest-exact", "depth": "nearest-exact"}
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)

Sample = dict[str, Tensor]


def _check_kinds(sample: Sample, kinds: dict[str, str]) -> None:
    unknown = sorted(set(sample) - set(kinds))
    if unknown:
        raise KeyError(f"no transform kind for sample keys {unknown}; known: {kinds}")


def resize(sample: Sample, kinds: dict[str, str], size: tuple[int, int]) -> Sample:
    """Resample every entry to ``size`` (H, W) with its kind's interpolation."""
    _check_kinds(sample, kinds)
    out = {}
    for key, value in sample.items():
        mode = KIND_MODE[kinds[key]]
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        resized = F.interpolate(value[None].float(), size=size, mode=mode, **kwargs)[0]
        out[key] = resized.to(value.dtype) if not value.is_floating_point() else resized
    return out


def pad_to(sample: Sample, kinds: dict[str, str], size: tuple[int, int]) -> Sample:
    """Pad bottom and right up to at least ``size`` with each kind's fill value."""
    _check_kinds(sample, kinds)
    out = {}
    for key, value in sample.items():
        h, w = value.shape[-2:]
        pad_h, pad_w = max(size[0] - h, 0), max(size[1] - w, 0)
        out[key] = F.pad(value, (0, pad_w, 0, pad_h), value=KIND_FILL[kinds[key]]) if pad_h or pad_w else value
    return out


def crop(sample: Sample, top: int, left: int, size: tuple[int, int]) -> Sample:
    """The window ``[top:top + h, left:left + w]`` of every entry."""
    return {key: value[..., top:top + size[0], left:left + size[1]] for key, value in sample.items()}


def hflip(sample: Sample, kinds: dict[str, str]) -> Sample:
    """Mirror left-right; a normal's x component changes sign."""
    _check_kinds(sample, kinds)
    out = {}
    for key, value in sample.items():
        flipped = value.flip(-1)
        if kinds[key] == "normals":
            flipped = flipped * torch.tensor([-1.0, 1.0, 1.0], dtype=flipped.dtype).view(3, 1, 1)
        out[key] = flipped
    return out


def normalize_image(sample: Sample) -> Sample:
    """Image intensities 0..255 -> [-1, 1]."""
    return {**sample, "image": sample["image"] / 127.5 - 1.0}


class TrainTransform:
    """Random scale (one of ``scales``), random crop to ``crop_size`` after padding, random horizontal flip,
    image to [-1, 1].

    Args:
        kinds: kind of every sample key (see the module docstring).
        crop_size: output (H, W).
        scales: scale factors drawn uniformly (the paper: 0.5 to 2.0 in steps of 0.25).
        flip: whether to flip with probability 0.5.
        generator: the random source; ``random`` module state by default (seeded per worker by Lightning).
    """

    def __init__(self, kinds: dict[str, str], crop_size: tuple[int, int], scales: Sequence[float] = PAPER_SCALES,
                 flip: bool = True, generator: random.Random | None = None) -> None:
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive numbers, got {list(scales)}")
        self.kinds, self.crop_size, self.scales, self.flip = kinds, tuple(crop_size), list(scales), flip
        self.random = generator or random

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[-2:]
        scale = self.random.choice(self.scales)
        if scale != 1.0:
            sample = resize(sample, self.kinds, (max(1, round(h * scale)), max(1, round(w * scale))))
        sample = pad_to(sample, self.kinds, self.crop_size)
        h, w = sample["image"].shape[-2:]
        top = self.random.randint(0, h - self.crop_size[0])
        left = self.random.randint(0, w - self.crop_size[1])
        sample = crop(sample, top, left, self.crop_size)
        if self.flip and self.random.random() < 0.5:
            sample = hflip(sample, self.kinds)
        return normalize_image(sample)


class EvalTransform:
    """Pad to ``size`` (no resize, as the paper evaluates), image to [-1, 1]. An image larger than ``size``
    is an error: evaluation never crops away labelled pixels."""

    def __init__(self, kinds: dict[str, str], size: tuple[int, int]) -> None:
        self.kinds, self.size = kinds, tuple(size)

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[-2:]
        if h > self.size[0] or w > self.size[1]:
            raise ValueError(f"image of size {h}x{w} is larger than the evaluation size {self.size[0]}x"
                             f"{self.size[1]}; set crop_size to at least the largest image")
        return normalize_image(pad_to(sample, self.kinds, self.size))
