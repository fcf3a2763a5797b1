"""Tests of the CIFAR-100 20-task data module on tiny fake pickles in the real format."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.cifar100 import CIFAR100MultiTask
from datamodules.datasets.cifar100 import CIFAR100_MEAN, CIFAR100_STD, superclass_ranks
from datamodules.errors import DatasetNotFoundError
from datamodules.samples.cifar100 import COARSE_LABEL_NAMES, FINE_TO_COARSE, FOLDER, make_cifar100, read_pickle, write_pickle
from dymu.tasks import IGNORE_INDEX, task_losses

NUM_TRAIN, NUM_TEST = 200, 100


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar100(tmp_path_factory.mktemp("cifar"), num_train=NUM_TRAIN, num_test=NUM_TEST)


@pytest.fixture(scope="module")
def dm(root: Path) -> CIFAR100MultiTask:
    module = CIFAR100MultiTask(root, batch_size=32)
    module.setup("fit")
    return module


def expected_image(row: np.ndarray) -> np.ndarray:
    """A pickle row normalised independently of the module: float64, channel-major planes."""
    image = row.reshape(3, 32, 32).astype(np.float64) / 255.0
    return (image - np.array(CIFAR100_MEAN)[:, None, None]) / np.array(CIFAR100_STD)[:, None, None]


def rank_rule(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Label per image: the rank of its fine label among the sorted fine labels of its superclass."""
    members = {c: sorted(set(fine[coarse == c].tolist())) for c in range(20)}
    return np.array([members[c].index(f) for f, c in zip(fine.tolist(), coarse.tolist())])


# ---------------------------------------------------------------------------------------------------------
# Tasks and labels
# ---------------------------------------------------------------------------------------------------------


def test_tasks_are_the_superclasses_in_coarse_order(dm: CIFAR100MultiTask, root: Path) -> None:
    meta = read_pickle(root / FOLDER / "meta")
    assert dm.task_names == meta["coarse_label_names"] == COARSE_LABEL_NAMES
    assert all(t.kind == "classification" and t.out_channels == 5 and t.scale == 1.0 for t in dm.tasks)
    assert dm.input_shape == (3, 32, 32)


def test_rank_rule_on_the_real_map() -> None:
    fine = np.arange(100)
    fine_to_coarse, rank = superclass_ranks(fine, np.array(FINE_TO_COARSE), Path("x"))
    assert fine_to_coarse.tolist() == FINE_TO_COARSE
    # aquatic_mammals holds fine labels 4 (beaver), 30 (dolphin), 55 (otter), 72 (seal), 95 (whale)
    assert rank[[4, 30, 55, 72, 95]].tolist() == [0, 1, 2, 3, 4]
    assert [f % 5 for f in (4, 30, 55, 72, 95)] == [4, 0, 0, 2, 0]  # why the rank rule, not fine % 5
    assert all(sorted(rank[fine_to_coarse == c].tolist()) == [0, 1, 2, 3, 4] for c in range(20))


@pytest.mark.parametrize("split", ["train", "test"])
def test_samples_carry_task_and_rank_label(dm: CIFAR100MultiTask, root: Path, split: str) -> None:
    raw = read_pickle(root / FOLDER / split)
    fine, coarse = np.array(raw["fine_labels"]), np.array(raw["coarse_labels"])
    data = dm.dataset(split, train=False)
    samples = [data[i] for i in range(len(data))]
    tasks = np.array([int(s["task"]) for s in samples])
    labels = np.array([int(s["label"]) for s in samples])
    assert len(samples) == len(fine)
    assert all(s["task"].dtype == torch.long and s["label"].dtype == torch.long for s in samples)
    np.testing.assert_array_equal(tasks, coarse)
    np.testing.assert_array_equal(labels, rank_rule(fine, coarse))
    assert (labels != fine % 5).any()
    for t in range(20):
        assert sorted(set(labels[tasks == t].tolist())) == [0, 1, 2, 3, 4], f"task {t} in {split}"


def test_unaugmented_image_is_the_normalised_pickle_row(root: Path) -> None:
    raw = {split: read_pickle(root / FOLDER / split)["data"] for split in ("train", "test")}
    module = CIFAR100MultiTask(root, augment=False)
    module.setup(None)
    for split, file in (("train", "train"), ("val", "test"), ("test", "test")):
        data = module.dataset(split)
        for i in range(0, len(data), 7):
            image = data[i]["image"]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            np.testing.assert_allclose(image.numpy(), expected_image(raw[file][i]), rtol=0, atol=1e-5)


def test_augmentation_reflect_pads_crops_and_flips(dm: CIFAR100MultiTask) -> None:
    clean = dm.dataset("train", train=False)[3]["image"].numpy()
    padded = np.pad(clean, ((0, 0), (4, 4), (4, 4)), mode="reflect")
    augmented = dm.dataset("train")
    torch.manual_seed(0)
    seen = set()
    for _ in range(120):
        image = augmented[3]["image"]
        assert image.shape == (3, 32, 32)
        matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if np.array_equal(padded[:, top:top + 32, left:left + 32][..., ::-1] if flip
                                     else padded[:, top:top + 32, left:left + 32], image.numpy())]
        assert len(matches) == 1, "every augmented image is one window of the reflect-padded image, maybe flipped"
        seen.add(matches[0])
    assert {flip for *_, flip in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 30
    # evaluation splits are never augmented
    assert torch.equal(dm.dataset("val")[0]["image"], dm.dataset("test", train=False)[0]["image"])


# ---------------------------------------------------------------------------------------------------------
# Batches and losses
# ---------------------------------------------------------------------------------------------------------


def test_collate_gives_each_task_its_own_images(dm: CIFAR100MultiTask) -> None:
    batch = next(iter(dm.val_dataloader()))
    task, label = batch["task"], batch["label"]
    assert batch["image"].shape == (32, 3, 32, 32)
    assert set(batch) == {"image", "task", "label", *dm.task_names}
    for t, name in enumerate(dm.task_names):
        mine = task == t
        assert torch.equal(batch[name][mine], label[mine])
        assert (batch[name][~mine] == IGNORE_INDEX).all()

    torch.manual_seed(0)
    outputs = {name: torch.randn(32, 5) for name in dm.task_names}
    losses = task_losses(dm.tasks, outputs, batch)
    assert losses.shape == (20,)
    for t, (spec, name) in enumerate(zip(dm.tasks, dm.task_names)):
        mine = task == t
        if mine.any():
            expected = F.cross_entropy(outputs[name][mine], label[mine])
            torch.testing.assert_close(losses[t], expected)
            assert spec.support(batch[name]) == int(mine.sum())
        else:
            assert losses[t] == 0
        # other tasks' images do not enter this task's loss
        noisy = outputs[name].clone()
        noisy[~mine] += 100 * torch.randn_like(noisy[~mine])
        torch.testing.assert_close(spec.loss(noisy, batch[name]), losses[t])


def test_train_loader_shuffles_drops_last_and_keeps_labels(dm: CIFAR100MultiTask) -> None:
    batches = list(dm.train_dataloader())
    assert len(batches) == NUM_TRAIN // 32
    assert all(b["image"].shape == (32, 3, 32, 32) for b in batches)
    assert all(set(b["label"].tolist()) <= set(range(5)) for b in batches)
    assert dm.sample_inputs(4).shape == (4, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# Splits, download, read-only data directory
# ---------------------------------------------------------------------------------------------------------


def test_val_size_holds_out_disjoint_training_images_deterministically(root: Path) -> None:
    raw = read_pickle(root / FOLDER / "train")
    module = CIFAR100MultiTask(root, val_size=30, seed=0)
    module.setup("fit")
    train, val = module.dataset("train"), module.dataset("val")
    assert (len(train), len(val)) == (NUM_TRAIN - 30, 30)
    rows_train, rows_val = set(train.indices.tolist()), set(val.indices.tolist())
    assert not rows_train & rows_val and rows_train | rows_val == set(range(NUM_TRAIN))
    np.testing.assert_allclose(val[0]["image"].numpy(), expected_image(raw["data"][int(val.indices[0])]), atol=1e-5)
    assert torch.equal(CIFAR100MultiTask(root, val_size=30, seed=0).split_indices("val"), val.indices)
    assert not torch.equal(CIFAR100MultiTask(root, val_size=30, seed=1).split_indices("val"), val.indices)
    assert len(CIFAR100MultiTask(root).dataset("val")) == NUM_TEST  # val_size=0: the test set


def test_val_size_must_fit(root: Path) -> None:
    with pytest.raises(ValueError, match="val_size"):
        CIFAR100MultiTask(root, val_size=-1)
    with pytest.raises(ValueError, match=rf"val_size \({NUM_TRAIN}\) must be smaller than the {NUM_TRAIN}"):
        CIFAR100MultiTask(root, val_size=NUM_TRAIN).setup("fit")


def test_prepare_data_downloads_only_when_asked(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", lambda *args, **kwargs: calls.append((args, kwargs)))
    CIFAR100MultiTask(root).prepare_data()
    assert calls == []
    CIFAR100MultiTask(tmp_path, download=True).prepare_data()
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] == str(tmp_path) and kwargs["download"] is True
    # before the download, the tasks are already known (the CLI links them into the model first)
    assert CIFAR100MultiTask(tmp_path, download=True).task_names == COARSE_LABEL_NAMES
    assert list(tmp_path.iterdir()) == []


def _snapshot(root: Path) -> dict[str, object]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()} | {"dirs": tuple(sorted(map(str, root.rglob("*"))))}


def test_data_directory_is_never_written(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path / "data")
    before = _snapshot(root)
    module = CIFAR100MultiTask(root, batch_size=50, val_size=20)
    module.prepare_data()
    module.setup(None)
    for loader in (module.train_dataloader(), module.val_dataloader(), module.test_dataloader()):
        for _ in loader:
            pass
    module.sample_inputs(3)
    assert _snapshot(root) == before


# ---------------------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------------------


def test_missing_root_names_root_layout_and_source(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as error:
        CIFAR100MultiTask(root).setup("fit")
    message = str(error.value)
    assert error.value.missing == root and isinstance(error.value, FileNotFoundError)
    assert str(root) in message and "cifar-100-python/" in message and "fine_labels" in message
    assert "cifar-100-python.tar.gz" in message and "download=True" in message


def test_missing_folder(tmp_path: Path) -> None:
    data = CIFAR100MultiTask(tmp_path)
    assert len(data.tasks) == 20  # known without the files (dymu info, model construction)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python not found") as error:
        data.setup("fit")
    assert error.value.missing == tmp_path / FOLDER


@pytest.mark.parametrize("name", ["train", "test", "meta"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    root = make_cifar100(tmp_path)
    (root / FOLDER / name).unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        CIFAR100MultiTask(root).setup("fit")
    assert error.value.missing == root / FOLDER / name
    assert str(root / FOLDER / name) in str(error.value)
    if name == "train":
        CIFAR100MultiTask(root).setup("test")  # what a stage does not need may be absent


def _move_fine_4_to_coarse_1(raw: dict[str, Any]) -> None:
    raw["coarse_labels"] = [1 if f == 4 else c for f, c in zip(raw["fine_labels"], raw["coarse_labels"])]


def _one_fine_4_to_coarse_1(raw: dict[str, Any]) -> None:
    i = raw["fine_labels"].index(4)
    raw["coarse_labels"][i] = 1


BAD_TRAIN: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "no fine_labels": (lambda raw: raw.pop("fine_labels"), r"no key\(s\) \['fine_labels'\]"),
    "no data": (lambda raw: raw.pop("data"), r"no key\(s\) \['data'\]"),
    "row length": (lambda raw: raw.update(data=raw["data"][:, :3071]), r"shape \(n, 3072\).*shape \(200, 3071\)"),
    "images as 4-D": (lambda raw: raw.update(data=raw["data"].reshape(-1, 3, 32, 32)), r"shape \(n, 3072\)"),
    "float data": (lambda raw: raw.update(data=raw["data"].astype(np.float32)), r"uint8.*got float32"),
    "fine out of range": (lambda raw: raw["fine_labels"].__setitem__(0, 100), r"fine_labels must lie in 0\.\.99"),
    "coarse out of range": (lambda raw: raw["coarse_labels"].__setitem__(0, -1), r"coarse_labels must lie in 0\.\.19"),
    "label count": (lambda raw: raw["fine_labels"].pop(), r"fine_labels must be 200 integers"),
    "fine in two superclasses": (_one_fine_4_to_coarse_1, r"fine label 4 appears under superclasses \[0, 1\]"),
    "superclass with 4 fine labels": (_move_fine_4_to_coarse_1, r"exactly 5 fine labels.*\{0: 4, 1: 6\}"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_malformed_train_pickle(tmp_path: Path, case: str) -> None:
    root = make_cifar100(tmp_path)
    path = root / FOLDER / "train"
    raw = read_pickle(path)
    mutate, message = BAD_TRAIN[case]
    mutate(raw)
    write_pickle(path, raw)
    with pytest.raises(ValueError, match=message) as error:
        CIFAR100MultiTask(root).setup("fit")
    assert str(error.value).startswith(str(path))


def test_meta_without_coarse_names(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path)
    path = root / FOLDER / "meta"
    write_pickle(path, {"fine_label_names": read_pickle(path)["fine_label_names"]})
    with pytest.raises(ValueError, match=rf"{path}: no key\(s\) \['coarse_label_names'\]"):
        _ = CIFAR100MultiTask(root).tasks


def test_test_file_with_another_superclass_map(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path)
    path = root / FOLDER / "test"
    raw = read_pickle(path)
    swap = {4: 1, 1: 4}  # beaver and aquarium_fish trade superclasses: still 5 per superclass
    raw["coarse_labels"] = [FINE_TO_COARSE[swap.get(f, f)] for f in raw["fine_labels"]]
    write_pickle(path, raw)
    CIFAR100MultiTask(root).setup("test")  # consistent on its own
    with pytest.raises(ValueError, match="fine -> coarse map differs") as error:
        CIFAR100MultiTask(root).setup("fit")
    assert str(path) in str(error.value) and str(root / FOLDER / "train") in str(error.value)


executed: list[str] = []


def _record(text: str) -> None:
    executed.append(text)


class _Payload:
    def __reduce__(self) -> tuple:
        return (_record, ("ran",))


@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps({"data": _Payload()}, protocol=2),
                                     pickle.dumps([1, 2, 3], protocol=2)], ids=["garbage", "code", "list"])
def test_unreadable_pickle(tmp_path: Path, content: bytes) -> None:
    root = make_cifar100(tmp_path)
    path = root / FOLDER / "train"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}: (not a readable CIFAR-100 python pickle|expected a pickled dict)"):
        CIFAR100MultiTask(root).setup("fit")
    assert executed == []


def test_python2_numpy_global_names_load(tmp_path: Path) -> None:
    root = make_cifar100(tmp_path)
    path = root / FOLDER / "train"
    content = path.read_bytes()
    assert b"numpy._core.multiarray" in content
    # the real files, written by Python 2 numpy, name numpy.core (not numpy._core)
    path.write_bytes(content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    module = CIFAR100MultiTask(root, augment=False)
    module.setup("fit")
    np.testing.assert_allclose(module.dataset("train")[0]["image"].numpy(),
                               expected_image(read_pickle(path)["data"][0]), atol=1e-5)
