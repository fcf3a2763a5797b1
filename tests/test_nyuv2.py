"""Tests of the NYU-v2 data module on tiny generated ``NYUD_MT`` sets (``datamodules/samples/nyuv2.py``): decoding,
augmentation, padding, losses over invalid pixels, the untouched data directory and every bad-data message."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.errors import DatasetNotFoundError
from datamodules.nyuv2 import NYUv2
from datamodules.samples.nyuv2 import DEFAULT_SIZE, DEFAULT_TRAIN_IDS, DEFAULT_VAL_IDS, make_nyud_mt, nyud_file, read_raw

H, W = DEFAULT_SIZE
ALL_TASKS = ["semseg", "normals", "depth", "edges"]
# Row of the image each raw class of the row-coded segmentation comes from (the generator's 1 + 39 y // (H - 1)).
ROW_OF_CLASS = {1 + 39 * y // (H - 1): y for y in range(H)}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_nyud_mt(tmp_path)


def module(root: Path, **kwargs: object) -> NYUv2:
    config: dict[str, object] = {"tasks": ALL_TASKS, "crop_size": (H, W), "batch_size": 2}
    config.update(kwargs)
    return NYUv2(root, **config)  # type: ignore[arg-type]


def decoded(raw: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """What the module must return for raw arrays under the evaluation transform at the image's size."""
    semseg = raw["semseg"].astype(np.int64)
    return {
        "image": torch.from_numpy(raw["image"].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1,
        "semseg": torch.from_numpy(np.where(semseg == 0, 255, semseg - 1)),
        "normals": torch.from_numpy(raw["normals"]).permute(2, 0, 1),
        "depth": torch.from_numpy(raw["depth"])[None],
        "edges": torch.from_numpy(raw["edges"])[None],
    }


# ---------------------------------------------------------------------------------------------------------
# Configuration, decoding, batches
# ---------------------------------------------------------------------------------------------------------


def test_defaults_are_dymu_setting_with_paper_scales(root: Path) -> None:
    dm = NYUv2(root)
    assert dm.task_names == ["semseg", "normals", "depth"]
    assert [(t.kind, t.out_channels, t.scale) for t in dm.tasks] == [
        ("semseg", 40, 1.0), ("normals", 3, 10.0), ("depth", 1, 3.0)]
    assert dm.input_shape == (3, 480, 640)
    assert (dm.batch_size, dm.num_workers) == (8, 0)
    edges = NYUv2(root, tasks=["edges", "depth"], scales={"depth": 2.0}, crop_size=[32, 48])
    assert [(t.name, t.scale) for t in edges.tasks] == [("edges", 50.0), ("depth", 2.0)]
    assert edges.tasks[0].pos_weight == 0.8  # type: ignore[attr-defined]
    assert edges.input_shape == (3, 32, 48)
    assert edges.hparams["tasks"] == ["edges", "depth"]


def test_decoding_is_exact(root: Path) -> None:
    dm = module(root)
    dm.setup("validate")
    data = dm.dataset("val")
    assert len(data) == len(DEFAULT_VAL_IDS)
    for index, image_id in enumerate(DEFAULT_VAL_IDS):
        raw = read_raw(root, image_id)
        sample, expected = data[index], decoded(raw)
        assert (raw["semseg"] == 0).any() and (raw["semseg"] == 40).any() and (raw["semseg"] == 1).any()
        assert sample["semseg"].dtype == torch.long
        assert torch.equal(sample["semseg"], expected["semseg"])
        assert set(sample["semseg"].unique().tolist()) <= {*range(40), 255}
        assert (sample["semseg"] == 39).any() and (sample["semseg"] == 0).any()
        assert (raw["depth"] == 0).any() and torch.equal(sample["depth"], expected["depth"])
        assert (raw["normals"] == 0).all(-1).any()
        torch.testing.assert_close(sample["normals"], expected["normals"])
        assert torch.equal(sample["normals"] == 0, expected["normals"] == 0)
        assert torch.equal(sample["edges"], expected["edges"])
        torch.testing.assert_close(sample["image"], expected["image"])


@pytest.mark.parametrize("tasks", [["depth", "semseg"], ["edges"], ["normals", "edges", "semseg", "depth"]])
def test_batches_are_keyed_by_task_names_in_the_order_given(root: Path, tasks: list[str]) -> None:
    dm = module(root, tasks=tasks, crop_size=(28, 36))
    dm.setup("fit")
    assert dm.task_names == tasks and [t.kind for t in dm.tasks] == tasks
    shapes = {"semseg": (2, 28, 36), "normals": (2, 3, 28, 36), "depth": (2, 1, 28, 36), "edges": (2, 1, 28, 36)}
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"image", *tasks}
        assert batch["image"].shape == (2, 3, 28, 36) and batch["image"].dtype == torch.float32
        for name in tasks:
            assert batch[name].shape == shapes[name]
            assert batch[name].dtype == (torch.long if name == "semseg" else torch.float32)
    assert dm.sample_inputs(3).shape == (3, *dm.input_shape)


# ---------------------------------------------------------------------------------------------------------
# Augmentation and padding
# ---------------------------------------------------------------------------------------------------------


def source_positions(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Source column and row of every pixel, once from the image's ramps and once from the labels."""
    image = sample["image"]
    return {
        "image_col": (image[0] + 1) / 2 * (W - 1),
        "image_row": (image[1] + 1) / 2 * (H - 1),
        "depth_col": (sample["depth"][0] - 0.5) / 0.25,
        "semseg_row": torch.tensor([float(ROW_OF_CLASS.get(int(c) + 1, -1)) for c in sample["semseg"].flatten()])
        .view(sample["semseg"].shape),
    }


@pytest.mark.parametrize(("scales", "tolerance"), [([1.0], 0.5), ([0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0], 1.0)])
def test_augmentation_keeps_image_and_labels_aligned(root: Path, scales: list[float], tolerance: float) -> None:
    # tolerance: JPEG error (up to 0.4 of a column) plus, when resampling, bilinear vs nearest (half a source pixel).
    dm = module(root, tasks=["semseg", "depth"], crop_size=(20, 28), augment_scales=scales)
    data = dm.dataset("train")  # evaluation at 20 x 28 would refuse the 24 x 32 images; training crops them
    random.seed(0)
    padded = checked = 0
    for step in range(40):
        sample = data[step % len(data)]
        pos = source_positions(sample)
        depth_valid, semseg_valid = sample["depth"][0] > 0, sample["semseg"] != 255
        assert (pos["depth_col"][depth_valid] - pos["image_col"][depth_valid]).abs().max() < tolerance
        assert (pos["semseg_row"][semseg_valid] - pos["image_row"][semseg_valid]).abs().max() < tolerance
        checked += int(depth_valid.sum() + semseg_valid.sum())
        pad = (sample["image"] == 0).all(0) & (sample["semseg"] == 255) & (sample["depth"][0] == 0)
        padded += int(pad.sum())
    assert checked > 40 * 20 * 28  # most pixels were compared
    assert (padded > 0) == (min(scales) < 1.0)  # at 0.5 the 12 x 16 image is padded to 20 x 28


def test_flip_negates_normals_x_and_mirrors_labels(root: Path) -> None:
    dm = module(root, tasks=["normals", "depth"], augment_scales=[1.0])
    data = dm.dataset("train")
    random.seed(1)
    seen = set()
    for step in range(12):
        index = step % len(data)
        sample, raw = data[index], decoded(read_raw(root, DEFAULT_TRAIN_IDS[index]))
        flipped = bool(sample["image"][0, :, 0].mean() > sample["image"][0, :, -1].mean())
        seen.add(flipped)
        normals, depth = raw["normals"], raw["depth"]
        if flipped:
            normals = normals.flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
            depth = depth.flip(-1)
        torch.testing.assert_close(sample["normals"], normals)
        assert torch.equal(sample["depth"], depth)
    assert seen == {True, False}


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_scaling_resamples_depth_without_changing_values(root: Path, scale: float) -> None:
    dm = module(root, tasks=["depth", "normals"], augment_scales=[scale])
    data = dm.dataset("train")
    random.seed(2)
    for index, image_id in enumerate(DEFAULT_TRAIN_IDS):
        raw = read_raw(root, image_id)
        sample = data[index]
        values = set(sample["depth"].unique().tolist())
        assert values <= set(raw["depth"].flatten().tolist()) | {0.0}
        assert len(values) >= 8  # many columns survive, not just the padding
        lengths = sample["normals"].norm(dim=0)
        assert torch.all(((lengths - 1).abs() < 1e-5) | (lengths == 0))


def test_eval_pads_with_each_kinds_fill_and_keeps_the_image_in_place(root: Path) -> None:
    dm = module(root, crop_size=(30, 40))
    sample = dm.dataset("test")[0]
    expected = decoded(read_raw(root, DEFAULT_VAL_IDS[0]))
    fills = {"image": 0.0, "semseg": 255, "normals": 0.0, "depth": 0.0, "edges": 255.0}
    for key, fill in fills.items():
        value = sample[key]
        assert value.shape[-2:] == (30, 40)
        torch.testing.assert_close(value[..., :H, :W], expected[key])
        assert (value[..., H:, :] == fill).all() and (value[..., :, W:] == fill).all()


# ---------------------------------------------------------------------------------------------------------
# Losses and metrics over invalid pixels
# ---------------------------------------------------------------------------------------------------------


def test_losses_and_metrics_ignore_invalid_and_padded_pixels(root: Path) -> None:
    dm = module(root, crop_size=(30, 40), batch_size=3)
    batch = next(iter(dm.test_dataloader()))
    torch.manual_seed(0)
    for task in dm.tasks:
        target = batch[task.name]
        pred = torch.randn(target.shape[0], task.out_channels, *target.shape[-2:])
        if task.kind == "semseg":
            invalid = (target == 255)[:, None].expand_as(pred)
        elif task.kind == "normals":
            invalid = (target == 0).all(1, keepdim=True).expand_as(pred)
        elif task.kind == "depth":
            invalid = target == 0
        else:
            invalid = target == 255
        assert invalid.any() and not invalid.all()
        changed = pred.masked_fill(invalid, 1e4)
        assert torch.equal(task.loss(pred, target), task.loss(changed, target)), task.name
        metrics = [task.make_metric(), task.make_metric()]
        task.update_metric(metrics[0], pred, target)
        task.update_metric(metrics[1], changed, target)
        torch.testing.assert_close(metrics[0].compute(), metrics[1].compute())
        # support counts valid pixels (times 3 for normals: the L1 averages over components)
        assert task.support(target) == int((~invalid).sum()) // (40 if task.kind == "semseg" else 1)


def test_data_directory_is_unchanged_after_setup_and_an_epoch(root: Path) -> None:
    def snapshot() -> dict[str, tuple[int, str]]:
        return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = snapshot()
    dirs = sorted(p for p in root.rglob("*") if p.is_dir())
    dm = module(root, crop_size=(28, 36))
    dm.setup("fit")
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        assert sum(len(batch["image"]) for batch in loader) >= 2
    dm.sample_inputs(2)
    assert snapshot() == before
    assert sorted(p for p in root.rglob("*") if p.is_dir()) == dirs


# ---------------------------------------------------------------------------------------------------------
# Bad data: each case names the file and what was expected
# ---------------------------------------------------------------------------------------------------------


def test_missing_root_names_root_layout_and_source(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "NYUD_MT"
    dm = NYUv2(missing)  # nothing is read before setup
    with pytest.raises(DatasetNotFoundError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert str(missing) in message and "gt_sets/train.txt" in message and "normals/<id>.npy" in message
    assert "drive.google.com" in message and "NYUD_MT.tgz" in message
    assert error.value.root == missing and error.value.missing == missing


def test_missing_split_list_is_named(root: Path) -> None:
    (root / "gt_sets" / "val.txt").unlink()
    dm = module(root)
    with pytest.raises(DatasetNotFoundError, match="gt_sets/val.txt not found") as error:
        dm.setup("validate")
    assert str(root) in str(error.value) and "segmentation/<id>.png" in str(error.value)


def test_missing_file_of_a_listed_id_fails_at_setup_only_for_configured_tasks(root: Path) -> None:
    depth = nyud_file(root, "depth", DEFAULT_TRAIN_IDS[2])
    depth.unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        module(root).setup("fit")
    assert error.value.missing == depth and f"{depth} not found" in str(error.value)
    module(root, tasks=["semseg", "normals"]).setup("fit")  # depth is not needed then
    for path in (root / "edge").iterdir():
        path.unlink()
    (root / "edge").rmdir()
    with pytest.raises(DatasetNotFoundError, match="edge not found"):
        module(root, tasks=["semseg", "edges"]).setup("fit")


def write_npy(what: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    """A corruption: replace the first training sample's ``what`` array by ``make(original)``."""
    def corrupt(root: Path) -> Path:
        path = nyud_file(root, what, DEFAULT_TRAIN_IDS[0])
        np.save(path, make(np.load(path)))
        return path
    return corrupt


def write_png(make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], Path]:
    def corrupt(root: Path) -> Path:
        path = nyud_file(root, "semseg", DEFAULT_TRAIN_IDS[0])
        Image.fromarray(make(np.asarray(Image.open(path)))).save(path)
        return path
    return corrupt


def write_bytes(what: str, make: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def corrupt(root: Path) -> Path:
        path = nyud_file(root, what, DEFAULT_TRAIN_IDS[0])
        path.write_bytes(make(path.read_bytes()))
        return path
    return corrupt


# (corruption, where it is caught, fragments the message must hold besides the file's path)
BAD_FILES = {
    "jpg not an image": (write_bytes("image", lambda b: b"not a jpeg at all"), "setup", ["cannot read the image", "JPEG"]),
    # The last 200 bytes are scan data: the header still parses at setup, decoding fails when the sample is read.
    "jpg truncated": (write_bytes("image", lambda b: b[:-200]), "item", ["cannot read the image", "RGB JPEG"]),
    "normals stored as 0..255": (write_npy("normals", lambda a: (a + 1) * 127.5), "item",
                                 ["unit vectors", "[-1, 1]", "2 * v / 255 - 1"]),
    "normals not unit length": (write_npy("normals", lambda a: a * 0.5), "item", ["length 1 within 0.1"]),
    "normals with nan": (write_npy("normals", lambda a: np.where(a == 0, np.nan, a)), "item", ["unit vectors"]),
    "normals wrong channels": (write_npy("normals", lambda a: a[..., :2]), "setup", ["(2", f"({H}, {W}, 3)"]),
    "normals integer dtype": (write_npy("normals", lambda a: a.astype(np.int8)), "setup", ["int8", "floating"]),
    "depth wrong shape": (write_npy("depth", lambda a: a[1:]), "setup", [f"({H - 1}, {W})", "images/0001.jpg"]),
    "depth transposed": (write_npy("depth", lambda a: a.T.copy()), "setup", [f"({W}, {H})", f"({H}, {W})"]),
    "depth integer millimetres": (write_npy("depth", lambda a: (a * 1000).astype(np.uint16)), "setup",
                                  ["uint16", "metres", "/ 1000"]),
    "depth float millimetres": (write_npy("depth", lambda a: a * 1000), "item", ["[0, 100]", "/ 1000"]),
    "depth negative": (write_npy("depth", lambda a: -a), "item", ["finite metres"]),
    "depth not npy": (write_bytes("depth", lambda b: b"garbage" * 20), "setup", ["not a NumPy .npy file"]),
    "depth pickled objects": (write_npy("depth", lambda a: a.astype(object)), "setup", ["dtype object"]),
    "edges out of range": (write_npy("edges", lambda a: a * 255), "item", ["[0, 1]", "255"]),
    "edges wrong shape": (write_npy("edges", lambda a: a[:, :-3]), "setup", [f"({H}, {W - 3})"]),
    "semseg class above 40": (write_png(lambda a: np.where(a == 40, 41, a).astype(np.uint8)), "item",
                              ["[41]", "1..40"]),
    "semseg 255 as ignore": (write_png(lambda a: np.where(a == 0, 255, a).astype(np.uint8)), "item", ["[255]"]),
    "semseg rgb": (write_png(lambda a: np.repeat(a[..., None], 3, axis=-1)), "setup", ["mode RGB", "single-channel"]),
    "semseg wrong size": (write_png(lambda a: a[:-2]), "setup", [f"{H - 2} x {W}", "images/0001.jpg"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_file_raises_value_error_naming_it(root: Path, case: str) -> None:
    corrupt, when, fragments = BAD_FILES[case]
    path = corrupt(root)
    dm = module(root)
    if when == "setup":
        with pytest.raises(ValueError) as error:
            dm.setup("fit")
    else:
        dm.setup("fit")
        data = dm.dataset("train")
        data[1]  # the other samples still load
        with pytest.raises(ValueError) as error:
            data[0]
    message = str(error.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_normals_slightly_off_unit_length_are_accepted_and_rescaled(root: Path) -> None:
    write_npy("normals", lambda a: a * 1.05)(root)
    sample = module(root, tasks=["normals"]).dataset("val", train=False)
    lengths = sample.read(0)["normals"].norm(dim=0)
    assert torch.all(((lengths - 1).abs() < 1e-5) | (lengths == 0))
    strict = module(root, tasks=["normals"], normals_tolerance=0.01)
    with pytest.raises(ValueError, match="length 1 within 0.01"):
        strict.dataset("train", train=False)[0]


@pytest.mark.parametrize(("content", "fragment"), [("\n\n", "lists no ids"), ("0001\n0002\n0001\n", "['0001']")])
def test_bad_split_list_is_named(root: Path, content: str, fragment: str) -> None:
    path = root / "gt_sets" / "train.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="gt_sets/train.txt") as error:
        module(root).setup("fit")
    assert fragment in str(error.value)


def test_setup_refuses_images_larger_than_crop_size_for_evaluation_and_too_few_training_ids(root: Path) -> None:
    small = module(root, crop_size=(16, 40))
    small.dataset("train")  # training crops may be smaller than the images
    with pytest.raises(ValueError, match=rf"up to {H} x {W}.*crop_size to at least \[{H}, {W}\]"):
        small.setup("validate")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        module(root, batch_size=len(DEFAULT_TRAIN_IDS) + 1).setup("fit")


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"tasks": ["semseg", "parts"]}, "unknown: ['parts']"),
    ({"tasks": ["depth", "depth"]}, "distinct"),
    ({"tasks": []}, "1 to 4"),
    ({"scales": {"edges": 50.0}}, "not configured"),
    ({"scales": {"depth": 0.0}}, "'depth'"),
    ({"crop_size": (480,)}, "two positive integers"),
    ({"augment_scales": [0.0]}, "positive"),
    ({"edge_pos_weight": 1.0}, "strictly between"),
    ({"normals_tolerance": -0.1}, "normals_tolerance"),
    ({"batch_size": 0}, "batch_size"),
])
def test_constructor_names_the_bad_argument(tmp_path: Path, kwargs: dict[str, object], fragment: str) -> None:
    config: dict[str, object] = {"tasks": ["semseg", "normals", "depth"]}
    config.update(kwargs)
    with pytest.raises(ValueError) as error:
        NYUv2(tmp_path, **config)  # type: ignore[arg-type]
    assert fragment in str(error.value)
