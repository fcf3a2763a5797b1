"""PASCAL-Context multi-task data module on tiny generated ``PASCAL_MT`` folders (datamodules/samples/pascal_context.py)."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.morphology import thin

from datamodules.datasets.pascal_context import HUMAN_PART_CLASS, NORMALS_VALID_CLASSES, TASK_NAMES, edge_map
from datamodules.errors import DatasetNotFoundError
from datamodules.pascal_context import DEFAULT_SCALES, THREE_TASKS, PascalContext
from datamodules.samples.pascal_context import (
    ALIGNED_NORMAL,
    LABELMAP_IDS,
    PART_TRUTH,
    TRAIN_IDS,
    VAL_IDS,
    aligned_pattern,
    break_pascal_mt,
    fake_sample,
    make_aligned_pascal_mt,
    make_pascal_mt,
)
from dymu.tasks import IGNORE_INDEX

CROP = (48, 64)  # at least every fixture image (up to 44x56)
ALL_IDS = (*TRAIN_IDS, *VAL_IDS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pascal_mt(tmp_path_factory.mktemp("pascal"))


@pytest.fixture
def copy(data: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture that a test may damage."""
    return Path(shutil.copytree(data, tmp_path / "PASCAL_MT"))


@pytest.fixture(scope="module")
def val_samples(data: Path) -> list[tuple[dict[str, torch.Tensor], object]]:
    """Evaluation samples of val.txt with the arrays the generator wrote for them."""
    dm = PascalContext(data, crop_size=CROP)
    dataset = dm.dataset("val")
    return [(dataset[i], fake_sample(VAL_IDS[i], len(TRAIN_IDS) + i)) for i in range(len(VAL_IDS))]


def _crop(target: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return target[..., :size[0], :size[1]].numpy()


def _padding(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    mask = torch.ones(target.shape[-2:], dtype=torch.bool)
    mask[:size[0], :size[1]] = False
    return target[..., mask]


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------


def test_semseg_reads_voc12_first_then_pascal_context(data: Path, val_samples: list) -> None:
    kinds = set()
    for sample, fake in val_samples:
        kinds.add(fake.semseg_dir)
        assert sample["semseg"].dtype == torch.long and sample["semseg"].shape == CROP
        np.testing.assert_array_equal(_crop(sample["semseg"], fake.size), fake.semseg)
        assert (_padding(sample["semseg"], fake.size) == IGNORE_INDEX).all()
        if fake.kind == 0:  # a decoy of all 7s sits in semseg/pascal-context: VOC12 wins
            assert (data / "semseg" / "pascal-context" / f"{fake.image_id}.png").exists()
            assert not (sample["semseg"] == 7).all()
    assert kinds == {"VOC12", "pascal-context"}
    assert set(val_samples[0][0]["semseg"].unique().tolist()) == {*range(21), IGNORE_INDEX}


def test_parts_map_person_parts_to_seven_classes_and_no_person_to_ignore(val_samples: list) -> None:
    for sample, fake in val_samples:
        parts = _crop(sample["parts"], fake.size)
        np.testing.assert_array_equal(parts, fake.parts)
        if fake.kind == 0:  # a person with parts; the dog's "head" and the part-less person are background
            assert set(np.unique(parts)) == set(range(7))
            h, w = fake.size
            assert (parts[h - 4:, w - 6:] == 0).all()
        else:  # a dog with person-like part names, a person without parts, no objects
            assert (parts == IGNORE_INDEX).all()


def test_part_names_follow_the_seven_groups() -> None:
    for name, group in PART_TRUTH.items():
        assert HUMAN_PART_CLASS[name] == group
    assert len(HUMAN_PART_CLASS) == 24  # PASCAL-Part's person parts
    for side in "lr":
        assert HUMAN_PART_CLASS[f"{side}ear"] == HUMAN_PART_CLASS[f"{side}ebrow"] == 1
        assert HUMAN_PART_CLASS[f"{side}hand"] == HUMAN_PART_CLASS[f"{side}larm"] == 4
        assert HUMAN_PART_CLASS[f"{side}foot"] == HUMAN_PART_CLASS[f"{side}lleg"] == 6


def test_saliency_is_thresholded_at_half(val_samples: list) -> None:
    for sample, fake in val_samples:
        target = sample["saliency"]
        assert target.shape == (1, *CROP) and target.dtype == torch.float32
        np.testing.assert_array_equal(_crop(target[0], fake.size), (fake.saliency > 127).astype(np.float32))
        assert target[0, 0, :4].tolist() == [0.0, 1.0, 0.0, 1.0]  # grey 127, 128, 0, 255
        assert (_padding(target, fake.size) == IGNORE_INDEX).all()


def test_normals_are_scaled_and_masked_by_the_nyu_context_classes(data: Path, val_samples: list) -> None:
    assert {k for k, valid in LABELMAP_IDS.items() if valid} <= NORMALS_VALID_CLASSES
    assert not {k for k, valid in LABELMAP_IDS.items() if not valid} & NORMALS_VALID_CLASSES
    unmasked = PascalContext(data, tasks=["normals"], crop_size=CROP, normals_mask="none").dataset("val")
    for i, (sample, fake) in enumerate(val_samples):
        scaled = 2.0 * fake.normals.astype(np.float32) / 255.0 - 1.0
        valid = np.isin(fake.label_map, [k for k, v in LABELMAP_IDS.items() if v])
        expected = np.where(valid[..., None], scaled, 0.0).transpose(2, 0, 1)
        assert sample["normals"].shape == (3, *CROP)
        np.testing.assert_allclose(_crop(sample["normals"], fake.size), expected, rtol=0, atol=1e-6)
        assert 0 < valid.mean() < 1
        assert (_padding(sample["normals"], fake.size) == 0).all()
        np.testing.assert_allclose(_crop(unmasked[i]["normals"], fake.size), scaled.transpose(2, 0, 1), atol=1e-6)


def _reference_edges(label_map: np.ndarray, thinned: bool = True) -> np.ndarray:
    padded = np.pad(label_map.astype(np.float64), 1, mode="reflect")  # numpy's reflect = OpenCV's reflect-101
    laplacian = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
                 - 4 * padded[1:-1, 1:-1])
    return (thin(laplacian != 0) if thinned else laplacian != 0).astype(np.float32)


def test_edges_are_the_thinned_laplacian_on_label_boundaries(val_samples: list) -> None:
    for sample, fake in val_samples:
        edges = _crop(sample["edges"][0], fake.size)
        np.testing.assert_array_equal(edges, _reference_edges(fake.label_map))
        labels = np.pad(fake.label_map, 1, mode="edge")
        centre = labels[1:-1, 1:-1]
        differs = [labels[:-2, 1:-1] != centre, labels[2:, 1:-1] != centre, labels[1:-1, :-2] != centre,
                   labels[1:-1, 2:] != centre]
        boundary = np.logical_or.reduce(differs)
        assert edges[~boundary].sum() == 0 and edges.sum() > 0  # only on boundaries
        # Every boundary pixel is near an edge: thinning keeps a line inside the band of non-zero Laplacian,
        # which is 2 pixels wide, or 3 where a 2-pixel strip lies between two regions.
        assert not _interior(edges == 0)[boundary].any()
        assert edges.sum() < _reference_edges(fake.label_map, thinned=False).sum()  # thinned
        assert (_padding(sample["edges"], fake.size) == IGNORE_INDEX).all()


def test_edge_map_matches_the_reference_filter_on_random_label_maps() -> None:
    rng = np.random.default_rng(0)
    for shape in [(9, 13), (16, 16), (5, 30)]:
        label_map = rng.integers(0, 4, size=shape).astype(np.uint16)
        np.testing.assert_array_equal(edge_map(label_map), _reference_edges(label_map))
    assert edge_map(np.full((6, 7), 440, dtype=np.uint16)).sum() == 0


def test_eval_batches_are_padded_to_crop_size(data: Path) -> None:
    dm = PascalContext(data, crop_size=CROP, batch_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", *TASK_NAMES}
    fake = fake_sample(VAL_IDS[1], len(TRAIN_IDS) + 1)  # kind 1: 36x56, so padded below
    h, w = fake.size
    assert batch["image"].shape == (3, 3, *CROP)
    assert (batch["image"][1, :, h:, :] == 0).all() and batch["image"].abs().max() <= 1
    for name in ("semseg", "parts", "saliency", "edges"):
        assert (batch[name][1, ..., h:, :] == IGNORE_INDEX).all()
        assert (batch[name][1, ..., :, w:] == IGNORE_INDEX).all()
    assert (batch["normals"][1, :, h:, :] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------


def _interior(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2 radius + 1)^2 neighbourhood has one label."""
    padded = np.pad(labels, radius, mode="edge")
    h, w = labels.shape
    same = np.ones_like(labels, dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            same &= padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w] == labels
    return same


def test_training_augmentation_keeps_image_and_labels_aligned(tmp_path: Path) -> None:
    data = make_aligned_pascal_mt(tmp_path)
    dm = PascalContext(data, crop_size=(32, 40), batch_size=2)
    dataset = dm.dataset("train")
    random.seed(0)
    nx = 2 * ALIGNED_NORMAL[0] / 255 - 1
    checked = 0
    for step in range(24):
        sample = dataset[step % len(dataset)]
        semseg = sample["semseg"].numpy()
        assert sample["image"].shape == (3, 32, 40)
        inner = _interior(semseg) & (semseg != IGNORE_INDEX)
        fg, bg = inner & (semseg == 15), inner & (semseg == 0)
        red = sample["image"][0].numpy()
        assert (red[fg] > 0.5).all() and (red[bg] < -0.5).all()
        for name in ("parts", "saliency", "edges"):
            target = sample[name].numpy().reshape(semseg.shape)
            assert ((target == IGNORE_INDEX) == (semseg == IGNORE_INDEX)).all()
        assert (sample["parts"].numpy()[fg] == 1).all() and (sample["parts"].numpy()[bg] == 0).all()
        assert (sample["saliency"][0].numpy()[fg] == 1).all() and (sample["saliency"][0].numpy()[bg] == 0).all()
        assert (sample["edges"][0].numpy()[inner] == 0).all()  # edges lie on the pattern's boundaries only
        normals = sample["normals"].numpy()
        assert (normals[:, bg] == 0).all()  # LabelMap 0 there: not an NYU / Context class
        assert np.allclose(np.abs(normals[0, fg]), nx) and np.allclose(normals[1:, fg].T, normals[1:, fg][:, :1].T)
        checked += int(fg.sum() + bg.sum())
    assert checked > 24 * 100


def test_flip_mirrors_every_key_and_negates_normals_x(tmp_path: Path) -> None:
    size = (40, 48)
    data = make_aligned_pascal_mt(tmp_path, size=size)
    dm = PascalContext(data, crop_size=size, augment_scales=[1.0], batch_size=2)
    train, plain = dm.dataset("train"), dm.dataset("train", train=False)
    reference = plain[0]
    pattern = torch.from_numpy(aligned_pattern(0, size)).long()
    assert torch.equal(reference["semseg"], 15 * pattern) and torch.equal(reference["parts"], pattern)
    assert not torch.equal(reference["image"], reference["image"].flip(-1))
    random.seed(1)
    seen = set()
    for _ in range(16):
        sample = train[0]
        flipped = torch.equal(sample["image"], reference["image"].flip(-1))
        assert flipped or torch.equal(sample["image"], reference["image"])
        seen.add(flipped)
        for name in ("semseg", "parts", "saliency", "edges"):
            assert torch.equal(sample[name], reference[name].flip(-1) if flipped else reference[name])
        normals = reference["normals"].flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
        assert torch.equal(sample["normals"], normals if flipped else reference["normals"])
    assert seen == {True, False}


# ---------------------------------------------------------------------------------------------------------
# Losses, loaders, the data directory
# ---------------------------------------------------------------------------------------------------------


def test_task_losses_ignore_255_and_invalid_normals(data: Path) -> None:
    dm = PascalContext(data, crop_size=CROP, batch_size=4)
    assert [t.name for t in dm.tasks] == list(TASK_NAMES)
    assert {t.name: t.scale for t in dm.tasks} == DEFAULT_SCALES
    assert [t.out_channels for t in dm.tasks] == [21, 7, 1, 3, 1]
    assert dm.tasks[-1].pos_weight == 0.95
    batch = next(iter(dm.val_dataloader()))
    g = torch.Generator().manual_seed(0)
    for task in dm.tasks:
        target = batch[task.name]
        if task.name in ("semseg", "parts"):
            ignored = (target == IGNORE_INDEX)[:, None].expand(-1, task.out_channels, -1, -1)
            perfect = 10.0 * torch.nn.functional.one_hot(target.clamp(max=task.out_channels - 1),
                                                         task.out_channels).permute(0, 3, 1, 2).float()
        elif task.name == "normals":
            ignored = (target.abs().sum(1, keepdim=True) == 0).expand_as(target)
            perfect = target.clone()
        else:
            ignored = target == IGNORE_INDEX
            perfect = torch.where(target == 1, 10.0, -10.0)
        assert ignored.any() and not ignored.all()
        noise = 5 * torch.randn(perfect.shape, generator=g)
        wrong_on_ignored = torch.where(ignored, noise, perfect)
        torch.testing.assert_close(task.loss(wrong_on_ignored, target), task.loss(perfect, target))
        wrong_everywhere = perfect + torch.where(ignored, 0.0, noise)
        assert task.loss(wrong_everywhere, target) > task.loss(perfect, target)


def _listing(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else (0, "dir") for p in sorted(root.rglob("*"))}


def test_loaders_without_trainer_and_the_data_dir_is_unchanged(data: Path) -> None:
    before = _listing(data.parent)
    dm = PascalContext(data, tasks=["saliency", "semseg", "parts"], crop_size=(32, 32), batch_size=3)
    assert dm.task_names == ["saliency", "semseg", "parts"] and dm.input_shape == (3, 32, 32)
    batches = list(dm.train_dataloader())
    assert len(batches) == len(TRAIN_IDS) // 3  # the incomplete batch is dropped
    for batch in batches:
        assert set(batch) == {"image", "saliency", "semseg", "parts"}
        assert batch["semseg"].shape == (3, 32, 32) and batch["saliency"].shape == (3, 1, 32, 32)
    dm = PascalContext(data, crop_size=CROP, batch_size=3)
    dm.setup("fit")
    seen = sum(batch["image"].shape[0] for batch in dm.val_dataloader())
    assert seen == len(VAL_IDS)
    assert set(next(iter(dm.val_dataloader()))) == {"image", *TASK_NAMES}
    assert dm.sample_inputs(2).shape == (2, 3, *CROP)
    dm.setup("test")
    assert len(dm.dataset("test")) == len(VAL_IDS)  # the paper evaluates on val
    assert _listing(data.parent) == before


def test_evaluation_images_larger_than_the_crop_fail_at_setup(data: Path) -> None:
    with pytest.raises(ValueError, match=r"lists images up to 44 x 56 .*larger than crop_size 32 x 32.*at least \[44, 56\]"):
        PascalContext(data, crop_size=(32, 32)).setup("validate")


def test_three_task_setting_needs_only_its_files(copy: Path) -> None:
    for defect in ("missing_normals", "missing_labelmap"):
        break_pascal_mt(copy, TRAIN_IDS[0], defect)
    dm = PascalContext(copy, tasks=list(THREE_TASKS), crop_size=CROP, batch_size=2)
    dm.setup("fit")
    assert set(dm.dataset("train")[0]) == {"image", *THREE_TASKS}
    with pytest.raises(DatasetNotFoundError):
        PascalContext(copy, tasks=["edges"], crop_size=CROP, batch_size=2).setup("fit")


# ---------------------------------------------------------------------------------------------------------
# Bad data and bad arguments
# ---------------------------------------------------------------------------------------------------------


def test_missing_root_names_root_layout_and_source(tmp_path: Path) -> None:
    root = tmp_path / "nowhere" / "PASCAL_MT"
    with pytest.raises(DatasetNotFoundError) as info:
        PascalContext(root).setup("fit")
    message = str(info.value)
    assert str(root) in message and "JPEGImages/<id>.jpg" in message and "PASCAL_MT.tgz" in message
    assert info.value.missing == root


def test_missing_split_file(copy: Path) -> None:
    (copy / "ImageSets" / "Context" / "val.txt").unlink()
    dm = PascalContext(copy, crop_size=CROP)
    with pytest.raises(DatasetNotFoundError, match=r"ImageSets/Context/val\.txt"):
        dm.setup("validate")


def test_empty_split_file(copy: Path) -> None:
    (copy / "ImageSets" / "Context" / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"train\.txt: lists no ids"):
        PascalContext(copy, crop_size=CROP).setup("fit")


@pytest.mark.parametrize(
    ("defect", "fragment"),
    [
        ("missing_image", "JPEGImages/{id}.jpg"),
        ("missing_semseg", "semseg/VOC12/{id}.png or "),
        ("missing_parts", "human_parts/{id}.mat"),
        ("missing_saliency", "sal_distill/{id}.png"),
        ("missing_normals", "normals_distill/{id}.png"),
        ("missing_labelmap", "pascal-context/trainval/{id}.mat"),
    ],
)
def test_missing_file_of_a_listed_id_fails_at_setup(copy: Path, defect: str, fragment: str) -> None:
    image_id = TRAIN_IDS[2]
    path = break_pascal_mt(copy, image_id, defect)
    with pytest.raises(DatasetNotFoundError) as info:
        PascalContext(copy, crop_size=CROP, batch_size=2).setup("fit")
    message = str(info.value)
    assert fragment.format(id=image_id) in message and str(copy) in message and image_id in message
    assert "Expected layout" in message and "PASCAL_MT.tgz" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("defect", "fragment"),
    [
        ("unreadable_image", "cannot read the image"),
        ("labelmap_without_key", "no variable 'LabelMap'"),
        ("labelmap_float", "2-D integer"),
        ("labelmap_wrong_size", "label of size 41x48, but its image is 40x48"),
        ("semseg_wrong_size", "label of size 40x51, but its image is 40x48"),
        ("semseg_out_of_range", r"found \[21\]"),
        ("semseg_rgb", "palette"),
        ("saliency_rgb", "grey 8-bit PNG"),
        ("normals_grey", "RGB 8-bit PNG"),
        ("parts_without_anno", "no variable 'anno'"),
        ("parts_unknown_name", "unknown person part 'tail'"),
        ("parts_wrong_size", "42x48 but its image is 40x48"),
        ("parts_not_a_struct", "unexpected structure"),
        ("unreadable_mat", "cannot read it as a MATLAB .mat file"),
    ],
)
def test_malformed_file_names_the_file_and_the_expectation(copy: Path, defect: str, fragment: str) -> None:
    image_id = TRAIN_IDS[0]  # kind 0: 40x48
    path = break_pascal_mt(copy, image_id, defect)
    dm = PascalContext(copy, crop_size=CROP, batch_size=2)
    dm.setup("fit")  # contents are checked when a sample is loaded (image headers also at evaluation setup)
    with pytest.raises(ValueError, match=fragment) as info:
        dm.dataset("train", train=False)[0]
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"tasks": ["semseg", "depth"]}, "unknown: \\['depth'\\]"),
        ({"tasks": ["semseg", "semseg"]}, "distinct"),
        ({"tasks": []}, "1 to 5 distinct"),
        ({"tasks": ["semseg"], "scales": {"parts": 2.0}}, "not configured"),
        ({"scales": {"edges": 0.0}}, "positive"),
        ({"crop_size": (512,)}, "crop_size"),
        ({"crop_size": (0, 512)}, "crop_size"),
        ({"augment_scales": []}, "augment_scales"),
        ({"augment_scales": [1.0, -0.5]}, "augment_scales"),
        ({"normals_mask": "json"}, "normals_mask"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PascalContext(tmp_path, **kwargs)


def test_scale_overrides_and_hyperparameters(tmp_path: Path) -> None:
    dm = PascalContext(tmp_path, tasks=["edges", "semseg"], scales={"edges": 20.0})
    assert [(t.name, t.scale) for t in dm.tasks] == [("edges", 20.0), ("semseg", 1.0)]
    assert dm.hparams["tasks"] == ["edges", "semseg"] and dm.input_shape == (3, 512, 512)
