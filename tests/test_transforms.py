"""Joint image/label augmentation: alignment, fill values, the normals' flip, evaluation padding."""

from __future__ import annotations

import random

import pytest
import torch

from datamodules.transforms import EvalTransform, TrainTransform, hflip, pad_to, resize

KINDS = {"image": "image", "semseg": "label", "normals": "normals", "depth": "depth"}


def sample(h: int = 6, w: int = 8, block: int = 1) -> dict[str, torch.Tensor]:
    label = (torch.arange(h * w) % 7).view(1, h, w)
    if block > 1:  # constant blocks, so that bilinear resampling leaves their interiors exact
        label = label.repeat_interleave(block, 1).repeat_interleave(block, 2)
        h, w = h * block, w * block
    normals = torch.nn.functional.normalize(torch.randn(3, h, w, generator=torch.Generator().manual_seed(0)), dim=0)
    return {
        # every image channel encodes the label, so alignment can be read back from any crop
        "image": (label.float() * 30.0).expand(3, h, w).clone(),
        "semseg": label.clone(),
        "normals": normals,
        "depth": label.float() + 1.0,
    }


def test_hflip_mirrors_everything_and_negates_normals_x() -> None:
    s = sample()
    out = hflip(s, KINDS)
    assert torch.equal(out["semseg"], s["semseg"].flip(-1))
    assert torch.equal(out["normals"][0], -s["normals"][0].flip(-1))
    assert torch.equal(out["normals"][1:], s["normals"][1:].flip(-1))
    assert torch.equal(out["depth"], s["depth"].flip(-1))


def test_pad_fills_each_kind_with_its_ignore_value() -> None:
    out = pad_to(sample(2, 3), KINDS, (4, 5))
    assert out["image"][:, 2:, :].eq(127.5).all() and out["image"][:, :, 3:].eq(127.5).all()
    assert out["semseg"][:, 2:, :].eq(255).all() and out["semseg"].dtype == torch.long
    assert out["normals"][:, :, 3:].eq(0).all() and out["depth"][:, 2:, :].eq(0).all()


def test_resize_keeps_labels_integral_and_depth_values() -> None:
    s = sample()
    out = resize(s, KINDS, (12, 16))
    assert out["semseg"].dtype == torch.long
    assert set(out["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist())
    assert set(out["depth"].unique().tolist()) <= set(s["depth"].unique().tolist())  # nearest: no new depths
    assert torch.allclose(out["normals"].norm(dim=0), torch.ones(12, 16), atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_train_transform_keeps_image_and_labels_aligned(seed: int) -> None:
    transform = TrainTransform(KINDS, crop_size=(20, 20), generator=random.Random(seed))
    out = transform(sample(4, 5, block=6))
    assert out["image"].shape == (3, 20, 20) and out["semseg"].shape == (1, 20, 20)
    label = out["semseg"][0]
    valid = label != 255
    # pixels whose 3x3 neighbourhood has one label: the bilinear image must show exactly that label there
    lab = label.float()[None, None]
    interior = (torch.nn.functional.max_pool2d(lab, 3, 1, 1) == -torch.nn.functional.max_pool2d(-lab, 3, 1, 1))[0, 0]
    interior &= valid
    interior[[0, -1], :] = False  # the crop's border pixels have unseen neighbours
    interior[:, [0, -1]] = False
    assert interior.sum() > 20
    image_label = (out["image"][0] + 1.0) * 127.5 / 30.0
    assert torch.allclose(image_label[interior], label[interior].float(), atol=1e-3)
    assert torch.equal(out["depth"][0][valid], label[valid].float() + 1.0)
    # padded pixels: image 0 after normalisation, zero normals and depth
    assert out["image"][:, ~valid].eq(0).all() and out["depth"][0][~valid].eq(0).all()
    assert out["normals"][:, ~valid].eq(0).all()


def test_train_transform_flip_negates_normals_x() -> None:
    s = sample(5, 5)
    flipped = TrainTransform(KINDS, (5, 5), scales=[1.0], flip=True, generator=random.Random(0))
    seen_flip = False
    for _ in range(20):
        out = flipped(dict(s))
        if torch.equal(out["semseg"], s["semseg"].flip(-1)) and not torch.equal(out["semseg"], s["semseg"]):
            assert torch.allclose(out["normals"][0], -s["normals"][0].flip(-1))
            seen_flip = True
        else:
            assert torch.equal(out["normals"], s["normals"])
    assert seen_flip


def test_eval_transform_pads_without_resizing_and_rejects_larger_images() -> None:
    s = sample(4, 6)
    out = EvalTransform(KINDS, (5, 7))(s)
    assert torch.equal(out["semseg"][:, :4, :6], s["semseg"])
    assert torch.allclose(out["image"][:, :4, :6], s["image"] / 127.5 - 1.0)
    with pytest.raises(ValueError, match="larger than the evaluation size"):
        EvalTransform(KINDS, (3, 7))(s)


def test_unknown_key_is_named() -> None:
    with pytest.raises(KeyError, match="parts"):
        hflip({"parts": torch.zeros(1, 2, 2)}, KINDS)
