"""The benchmarked networks: each config's backbone and data, at the benchmark's, the quick and the paper's sizes.

The paper's data sets are replaced by the fixtures that ``datamodules/samples`` writes in their on-disk formats (the
benchmark times the code, not the labels); the quickstart and the synthetic regression generate their data.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from dymu.backbones.base import build_backbone
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference, sample_training_preference

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    """Input size (``crop`` for image data, None where the data fixes it) and batch size."""

    crop: tuple[int, int] | None
    batch: int


@dataclass(frozen=True)
class Network:
    """One benchmarked network.

    Attributes:
        name: row label.
        config: the config file whose ``backbone``, ``data`` and ``edge.model`` are used.
        bench, quick, paper: sizes of the default run, of ``--quick`` and of ``--paper_size``.
        fixture: writes the data set's fixture under a folder and returns the data root, given the number
            of training images and their ``(H, W)`` (None: generated data).
        fixture_image: ``(H, W)`` of the fixture's images at the benchmark's crop.
        loading: ``(crop, batch, raw image (H, W))`` of the paper, for the data loading rows (None: none).
        compile_on_cpu: whether ``torch.compile`` rows run on CPU without ``--compile_all`` (the paper
            networks' graphs take minutes to compile on a small CPU; on a GPU they always run).
        quick_backbone: backbone arguments replaced in ``--quick`` (narrower layers, the same structure).
    """

    name: str
    config: str
    bench: Size
    quick: Size
    paper: Size
    fixture: Callable[[Path, int, tuple[int, int]], Path] | None = None
    fixture_image: tuple[int, int] = (40, 48)
    loading: tuple[tuple[int, int], int, tuple[int, int]] | None = None
    compile_on_cpu: bool = True
    quick_backbone: dict[str, Any] = field(default_factory=dict)

    def read_config(self, quick: bool = False) -> dict[str, Any]:
        """The config; with ``quick``, the backbone's arguments narrowed by ``quick_backbone``."""
        with open(ROOT / self.config) as f:
            config = yaml.safe_load(f)
        if quick and self.quick_backbone:
            backbone = config["backbone"]
            backbone["init_args"] = {**(backbone.get("init_args") or {}), **self.quick_backbone}
        return config


def _pascal_fixture(root: Path, count: int, size: tuple[int, int]) -> Path:
    from datamodules.samples.pascal_context import make_pascal_mt

    return make_pascal_mt(root, train_ids=[f"2008_{i:06d}" for i in range(count)], val_ids=["2009_000001"],
                          size=size)


def _nyu_fixture(root: Path, count: int, size: tuple[int, int]) -> Path:
    from datamodules.samples.nyuv2 import make_nyud_mt

    data = make_nyud_mt(root, train_ids=[f"{i:04d}" for i in range(1, count + 1)], val_ids=["9999"], size=size)
    # The fixture's depth ramp (0.5 + x / 4 m) passes the loader's 100 m limit beyond 398 pixels of width:
    # clipped to NYU's 10 m for the paper's 640, which changes what is read, not how long reading takes.
    for path in (data / "depth").glob("*.npy"):
        np.save(path, np.minimum(np.load(path), 10.0).astype(np.float32))
    return data


def _cifar_fixture(root: Path, count: int, size: tuple[int, int]) -> Path:
    from datamodules.samples.cifar100 import make_cifar100

    make_cifar100(root, num_train=max(100, count), num_test=100)
    return root


NETWORKS = [
    Network("quickstart", "configs/quickstart.yaml", Size((32, 32), 32), Size((16, 16), 4), Size((32, 32), 32)),
    Network("synthetic_regression", "configs/synthetic_regression.yaml", Size(None, 100), Size(None, 8),
            Size(None, 100)),
    Network("pascal_context", "configs/pascal_context/pipeline.yaml", Size((64, 64), 8), Size((48, 48), 2),
            Size((512, 512), 16), _pascal_fixture, loading=((512, 512), 16, (375, 500)), compile_on_cpu=False,
            quick_backbone={"aspp_channels": 16}),
    Network("nyuv2", "configs/nyuv2/pipeline.yaml", Size((64, 64), 4), Size((32, 32), 2), Size((480, 640), 8),
            _nyu_fixture, fixture_image=(48, 64), loading=((480, 640), 8, (480, 640)), compile_on_cpu=False,
            quick_backbone={"aspp_channels": 16}),
    Network("cifar100", "configs/cifar100/pipeline.yaml", Size(None, 16), Size(None, 2), Size(None, 128),
            _cifar_fixture, compile_on_cpu=False, quick_backbone={"width": 0.125}),
]


def instantiate(spec: dict[str, Any], **overrides: Any) -> Any:
    """``class_path`` + ``init_args`` (the configs' form), with ``overrides`` replacing init arguments."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**spec.get("init_args", {}), **overrides})


def make_datamodule(net: Network, config: dict[str, Any], size: Size, folder: Path | None,
                    image: tuple[int, int] | None = None, count: int | None = None) -> Any:
    """The config's data module on the fixture (or generated data) at ``size``, no worker processes."""
    count = max(count or size.batch, size.batch)
    overrides: dict[str, Any] = {"batch_size": size.batch, "num_workers": 0}
    data_class = config["data"]["class_path"]
    if data_class.endswith("SyntheticScenesDataModule"):
        assert size.crop is not None
        overrides.update(image_size=size.crop[0], num_train=count, num_val=size.batch, num_test=size.batch)
    elif data_class.endswith("SyntheticRegressionDataModule"):
        overrides.update(num_train=count, num_val=size.batch, num_test=size.batch)
    else:
        assert net.fixture is not None and folder is not None
        if image is None:  # evaluation pads to the crop, so no image may exceed it (fixtures vary by 8 pixels)
            image = net.fixture_image if size.crop is None else \
                (min(net.fixture_image[0], size.crop[0] - 8), min(net.fixture_image[1], size.crop[1] - 8))
        overrides["root"] = net.fixture(folder, count, image)
        if size.crop is not None:
            overrides["crop_size"] = size.crop
    return instantiate(config["data"], **overrides)


def first_batch(datamodule: Any, device: torch.device) -> dict[str, Tensor]:
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}


def edge_settings(config: dict[str, Any], n_tasks: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The edge hypernet's size arguments, the regularizer's keyword arguments and the preference groups,
    from the config's ``edge.model`` (with ``EdgeHypernetSearch``'s defaults)."""
    model = (config.get("edge") or {}).get("model") or {}
    hypernet = {"embed_dim": model.get("embed_dim", 32), "hidden": model.get("hidden", 100)}
    if model.get("pin_heads"):
        hypernet["pin_heads"] = True
    if model.get("c_conditioning", "embedding") != "embedding":
        hypernet["c_conditioning"] = model["c_conditioning"]
    tau = model.get("tau")
    regularizer = {"tau": 0.6 / n_tasks if tau is None else float(tau),
                   "lambda_active": model.get("lambda_active", 1.0),
                   "lambda_inactive": model.get("lambda_inactive", 0.1),
                   "layer_weighting": model.get("layer_weighting", "paper")}
    return hypernet, regularizer, int(model.get("preference_groups", 1))


def weight_groups(config: dict[str, Any]) -> int:
    return int(((config.get("weight") or {}).get("model") or {}).get("preference_groups", 1))


def build_model(config: dict[str, Any], tasks: list[Any], input_shape: tuple[int, ...],
                edge_args: dict[str, Any], seed: int = 0) -> DynamicMultiTaskModel:
    """The controllable model with random weights. The hypernets' heads start at zero (one tree for every
    preference, no BatchNorm shift); random heads make the preferences pick many trees, as a trained model's
    do, so the evaluation and the switch rows see many trees."""
    torch.manual_seed(seed)
    model = DynamicMultiTaskModel.build(build_backbone(config["backbone"]), tasks, edge=edge_args,
                                        weight={"embed_dim": 32, "hidden": 100}, input_shape=input_shape)
    assert model.edge_hypernet is not None and model.weight_hypernet is not None
    for head in [*model.edge_hypernet.heads, *(model.edge_hypernet.c_heads or [])]:
        nn.init.normal_(head.weight, std=1.0)
        nn.init.normal_(head.bias, std=0.5)
    for head in model.weight_hypernet.heads:
        nn.init.normal_(head.weight, std=0.01)
    return model


def training_preferences(n_tasks: int, count: int, seed: int = 0) -> list[Preference]:
    rng = np.random.default_rng(seed)
    return [sample_training_preference(n_tasks, rng) for _ in range(count)]
