"""``check_data()`` of every data module (the cheap layout check a runner calls before training) and what the
data modules share through ``MultiTaskDataModule``: the loaders and their DDP samplers."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import RandomSampler, SequentialSampler

from datamodules import (
    CIFAR100MultiTask,
    DatasetNotFoundError,
    NYUv2,
    PascalContext,
    SyntheticRegressionDataModule,
    SyntheticScenesDataModule,
)
from datamodules.base import MultiTaskDataModule
from datamodules.samples.cifar100 import make_cifar100
from datamodules.samples.nyuv2 import make_nyud_mt
from datamodules.samples.pascal_context import TRAIN_IDS, make_pascal_mt
from stages.common import build_data, read_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def pascal(root: Path, **kwargs: object) -> PascalContext:
    return PascalContext(root, **{"crop_size": (48, 64), "batch_size": 2, **kwargs})  # type: ignore[arg-type]


def nyu(root: Path, **kwargs: object) -> NYUv2:
    config = {"tasks": ["semseg", "normals", "depth", "edges"], "crop_size": (24, 32), "batch_size": 2, **kwargs}
    return NYUv2(root, **config)  # type: ignore[arg-type]


def cifar(root: Path, **kwargs: object) -> CIFAR100MultiTask:
    return CIFAR100MultiTask(root, **{"batch_size": 16, **kwargs})  # type: ignore[arg-type]


# data set -> (module factory, fixture writer returning the root, what an empty root misses first,
#              fragments of the expected layout, fragment of where to get the data)
DATASETS: dict[str, tuple[Callable[..., MultiTaskDataModule], Callable[[Path], Path], str, list[str], str]] = {
    "pascal_context": (pascal, make_pascal_mt, "ImageSets/Context/train.txt",
                       ["JPEGImages/<id>.jpg", "sal_distill/<id>.png"], "PASCAL_MT.tgz"),
    "nyuv2": (nyu, make_nyud_mt, "gt_sets/train.txt", ["images/<id>.jpg", "normals/<id>.npy"], "NYUD_MT.tgz"),
    "cifar100": (cifar, make_cifar100, "cifar-100-python", ["cifar-100-python/train", "fine_labels"],
                 "cifar-100-python.tar.gz"),
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny data set of each kind in its distributed layout (never modified; tests copy what they break)."""
    return {name: writer(tmp_path_factory.mktemp(name)) for name, (_, writer, *_rest) in DATASETS.items()}


def copy_of(fixtures: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixtures[name], tmp_path / fixtures[name].name))


def check_error(error: DatasetNotFoundError, root: Path, missing: Path, name: str) -> None:
    """The one-line message names the missing path, the root, the expected layout and where to get the data."""
    _, _, _, layout, source = DATASETS[name]
    message = str(error)
    assert "\n" not in message, message
    assert error.root == root and error.missing == missing
    assert f"{missing} not found" in message and f"data root: {root}" in message
    assert "Expected layout under the root:" in message and all(line in message for line in layout), message
    assert source in message


# ---------------------------------------------------------------------------------------------------------
# check_data on the real data sets' layouts
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DATASETS))
def test_check_data_passes_on_the_fixture(fixtures: dict[str, Path], name: str) -> None:
    make = DATASETS[name][0]
    make(fixtures[name]).check_data()


@pytest.mark.parametrize("name", list(DATASETS))
def test_check_data_names_a_missing_root(tmp_path: Path, name: str) -> None:
    make = DATASETS[name][0]
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as error:
        make(root).check_data()
    check_error(error.value, root, root, name)


@pytest.mark.parametrize("name", list(DATASETS))
def test_check_data_names_what_an_empty_root_misses_first(tmp_path: Path, name: str) -> None:
    make, _, first, _, _ = DATASETS[name]
    with pytest.raises(DatasetNotFoundError) as error:
        make(tmp_path).check_data()
    check_error(error.value, tmp_path, tmp_path / first, name)


# data set -> (path removed from a copy of the fixture, relative to its root)
MISSING = [
    ("pascal_context", "ImageSets/Context/val.txt"),
    ("pascal_context", "sal_distill"),
    ("pascal_context", "pascal-context/trainval"),
    ("nyuv2", "gt_sets/val.txt"),
    ("nyuv2", "edge"),
    ("cifar100", "cifar-100-python/train"),
    ("cifar100", "cifar-100-python/test"),
    ("cifar100", "cifar-100-python/meta"),
]


@pytest.mark.parametrize(("name", "relative"), MISSING)
def test_check_data_names_a_missing_split_list_folder_or_file(fixtures: dict[str, Path], tmp_path: Path,
                                                              name: str, relative: str) -> None:
    root = copy_of(fixtures, name, tmp_path)
    missing = root / relative
    shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
    make = DATASETS[name][0]
    with pytest.raises(DatasetNotFoundError) as error:
        make(root).check_data()
    check_error(error.value, root, missing, name)


def test_check_data_names_both_semseg_folders_when_neither_exists(fixtures: dict[str, Path], tmp_path: Path) -> None:
    root = copy_of(fixtures, "pascal_context", tmp_path)
    shutil.rmtree(root / "semseg" / "VOC12")
    pascal(root).check_data()  # the other candidate folder is enough for the layout check
    shutil.rmtree(root / "semseg" / "pascal-context")
    with pytest.raises(DatasetNotFoundError) as error:
        pascal(root).check_data()
    assert f"{root / 'semseg' / 'VOC12'} or {root / 'semseg' / 'pascal-context'} not found" in str(error.value)


def test_check_data_asks_only_for_the_configured_tasks(fixtures: dict[str, Path], tmp_path: Path) -> None:
    root = copy_of(fixtures, "pascal_context", tmp_path)
    shutil.rmtree(root / "sal_distill")
    shutil.rmtree(root / "pascal-context" / "trainval")
    pascal(root, tasks=["semseg", "parts", "normals"], normals_mask="none").check_data()
    with pytest.raises(DatasetNotFoundError, match="trainval not found"):
        pascal(root, tasks=["semseg", "parts", "normals"]).check_data()  # the normals' class mask needs it
    nyu_root = copy_of(fixtures, "nyuv2", tmp_path)
    shutil.rmtree(nyu_root / "edge")
    NYUv2(nyu_root, tasks=["semseg", "depth"]).check_data()


def test_cifar_check_data_with_download_leaves_the_files_to_prepare_data(tmp_path: Path) -> None:
    cifar(tmp_path / "empty", download=True).check_data()
    with pytest.raises(DatasetNotFoundError):
        cifar(tmp_path / "empty").check_data()


@pytest.mark.parametrize("name", list(DATASETS))
def test_check_data_reads_no_sample(fixtures: dict[str, Path], tmp_path: Path, name: str) -> None:
    """Contents are setup's business: a corrupt sample file passes check_data and fails at setup."""
    root = copy_of(fixtures, name, tmp_path)
    corrupt = {
        "pascal_context": root / "JPEGImages" / f"{TRAIN_IDS[0]}.jpg",
        "nyuv2": root / "images" / "0001.jpg",
        "cifar100": root / "cifar-100-python" / "train",
    }[name]
    corrupt.write_bytes(b"not what the format says")
    make = DATASETS[name][0]
    make(root).check_data()
    dm = make(root)
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        dm.setup("fit")
        dm.dataset("train", train=False)[0]


@pytest.mark.parametrize(("name", "relative"), MISSING)
def test_setup_raises_the_same_error_as_check_data(fixtures: dict[str, Path], tmp_path: Path, name: str,
                                                   relative: str) -> None:
    root = copy_of(fixtures, name, tmp_path)
    missing = root / relative
    shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
    make = DATASETS[name][0]
    with pytest.raises(DatasetNotFoundError) as checked:
        make(root).check_data()
    with pytest.raises(DatasetNotFoundError) as set_up:
        make(root).setup(None)
    assert str(set_up.value) == str(checked.value)


@pytest.mark.parametrize(("config", "first"), [
    ("pascal_context/pipeline.yaml", "ImageSets/Context/train.txt"),
    ("pascal_context/pipeline_3tasks.yaml", "ImageSets/Context/train.txt"),
    ("nyuv2/pipeline.yaml", "gt_sets/train.txt"),
    ("cifar100/pipeline.yaml", "cifar-100-python"),
])
def test_paper_configs_report_an_empty_data_root(tmp_path: Path, config: str, first: str) -> None:
    """What the runner does before any training: ``build_data(config["data"]).check_data()``."""
    data = read_yaml(CONFIGS / config)["data"]
    data["init_args"]["root"] = str(tmp_path)
    with pytest.raises(DatasetNotFoundError) as error:
        build_data(data).check_data()
    assert error.value.missing == tmp_path / first and "\n" not in str(error.value)


@pytest.mark.parametrize("config", ["quickstart.yaml", "synthetic_regression.yaml"])
def test_synthetic_configs_pass_check_data(config: str) -> None:
    build_data(read_yaml(CONFIGS / config)["data"]).check_data()


# ---------------------------------------------------------------------------------------------------------
# Synthetic data: check_data is the size check of the constructor
# ---------------------------------------------------------------------------------------------------------


def scenes(**kwargs: object) -> SyntheticScenesDataModule:
    config: dict[str, object] = {"num_train": 8, "num_val": 5, "num_test": 3, "image_size": 8, "batch_size": 2}
    config.update(kwargs)
    return SyntheticScenesDataModule(**config)  # type: ignore[arg-type]


def regression(**kwargs: object) -> SyntheticRegressionDataModule:
    config: dict[str, object] = {"num_train": 8, "num_val": 5, "num_test": 3, "batch_size": 2, "input_dim": 4,
                                 "output_dim": 2}
    config.update(kwargs)
    return SyntheticRegressionDataModule(**config)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [scenes, regression])
def test_synthetic_check_data_checks_the_sizes(make: Callable[..., MultiTaskDataModule]) -> None:
    dm = make()
    dm.check_data()
    dm.batch_size = 9
    with pytest.raises(ValueError, match=r"num_train \(8\): 8 training samples, fewer than batch_size \(9\)"):
        dm.check_data()
    with pytest.raises(ValueError, match=r"num_train \(8\): 8 training samples, fewer than batch_size \(9\)"):
        make(batch_size=9)
    with pytest.raises(ValueError, match="num_test must be at least 1, got 0"):
        make(num_test=0)


def test_file_data_modules_refuse_a_training_split_smaller_than_a_batch(fixtures: dict[str, Path]) -> None:
    for dm, source in ((pascal(fixtures["pascal_context"], batch_size=len(TRAIN_IDS) + 1), "train.txt"),
                       (cifar(fixtures["cifar100"], batch_size=201), "cifar-100-python/train")):
        with pytest.raises(ValueError, match=rf"{source}: \d+ training samples, fewer than batch_size"):
            dm.setup("fit")
        dm.dataset("val")  # evaluation splits have no such limit


# ---------------------------------------------------------------------------------------------------------
# The shared loaders: one set of rules for generated and file data
# ---------------------------------------------------------------------------------------------------------


def all_modules(fixtures: dict[str, Path]) -> dict[str, Callable[[], MultiTaskDataModule]]:
    """Name -> a factory of a fresh data module, for the generated and the file data."""
    files = {name: (lambda make=make, root=fixtures[name]: make(root)) for name, (make, *_rest) in DATASETS.items()}
    return {"scenes": scenes, "regression": regression, **files}


def test_evaluation_loaders_give_unrepeated_ddp_shards_and_training_stays_shuffled(fixtures: dict[str, Path]) -> None:
    for name, make in all_modules(fixtures).items():
        shards = {}
        for rank in (0, 1):
            dm = make()
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # type: ignore[assignment]
            for split in ("val", "test"):
                loader = getattr(dm, f"{split}_dataloader")()
                assert isinstance(loader.sampler, UnrepeatedDistributedSampler), name
                assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, rank)
                shards[split, rank] = list(loader.sampler)
            train = dm.train_dataloader()
            assert isinstance(train.sampler, RandomSampler) and train.drop_last, name
        for split in ("val", "test"):
            size = len(make().dataset(split))  # type: ignore[arg-type]
            together = shards[split, 0] + shards[split, 1]
            assert sorted(together) == list(range(size)), (name, split)  # every sample once, none padded in
            assert abs(len(shards[split, 0]) - len(shards[split, 1])) <= 1


def test_without_ddp_evaluation_is_sequential_and_batches_keep_their_order(fixtures: dict[str, Path]) -> None:
    for name, make in all_modules(fixtures).items():
        dm = make()
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, SequentialSampler) and not loader.drop_last, name
        first = next(iter(loader))
        data = dm.dataset("val")
        expected = torch.stack([data[i]["image"] for i in range(dm.batch_size)])
        assert torch.equal(first["image"], expected), name
        assert set(dm.task_names) <= set(first), name


def test_sample_inputs_are_shared_and_seeded(fixtures: dict[str, Path]) -> None:
    for name, make in all_modules(fixtures).items():
        dm = make()
        picked = dm.sample_inputs(2, seed=1)
        assert picked.shape == (2, *dm.input_shape), name
        assert torch.equal(picked, dm.sample_inputs(2, seed=1)), name
        train = dm.dataset("train", train=False)
        n = len(train)  # type: ignore[arg-type]
        index = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:2]
        assert torch.equal(picked, torch.stack([train[int(i)]["image"] for i in index])), name
