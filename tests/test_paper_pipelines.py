"""The paper configs, shrunk to a few CPU steps, run every stage on each generated fixture (bf16 autocast
included), and a 2-process DDP run (gloo) on a fixture gives the single-process validation metrics."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.samples.cifar100 import make_cifar100
from datamodules.samples.nyuv2 import make_nyud_mt
from datamodules.samples.pascal_context import VAL_IDS, make_pascal_mt
from dymu.anchor import AnchorNet, count_parameters
from stages.common import build_backbone_from_config, build_data
from stages.pipeline import load_pipeline_config
from stages.runner import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
CSV = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}
STAGES = ("anchor", "edge", "weight")


def cpu_trainer(steps: int, precision: str) -> dict:
    return {"max_steps": steps, "max_epochs": None, "accelerator": "cpu", "devices": 1, "strategy": "auto",
            "precision": precision, "val_check_interval": steps, "check_val_every_n_epoch": None,
            "enable_progress_bar": False, "enable_model_summary": False, "logger": CSV}


# dataset: (pipeline config, fixture writer, data overrides, backbone overrides)
CASES: dict[str, tuple[str, Callable[[Path], Path], dict, dict]] = {
    "pascal_context": ("pascal_context/pipeline.yaml", make_pascal_mt,
                       {"crop_size": [48, 56], "batch_size": 2, "num_workers": 0}, {}),
    "nyuv2": ("nyuv2/pipeline.yaml", make_nyud_mt, {"crop_size": [32, 32], "batch_size": 2, "num_workers": 0},
              {"aspp_channels": 16}),
    "cifar100": ("cifar100/pipeline.yaml", make_cifar100, {"batch_size": 16, "num_workers": 0},
                 {"width": 0.125}),
}


def fixture_config(dataset: str, tmp_path: Path, steps: int = 2, precision: str = "32-true",
                   writer: Callable[[Path], Path] | None = None) -> Path:
    """The paper's pipeline config on a fixture: tiny crops and batches, CPU, a few steps, CSV logs."""
    config_name, default_writer, data_args, backbone_args = CASES[dataset]
    writer = writer or default_writer
    config = load_pipeline_config(ROOT / "configs" / config_name).given_values()
    config["data"]["init_args"].update({"root": str(writer(tmp_path / "data")), **data_args})
    config["backbone"].setdefault("init_args", {}).update(backbone_args)
    config["affinity"] = {"num_images": 4}
    config["evaluate"] = {"num_preferences": 2, "num_cost_preferences": 10, "device": "cpu"}
    for stage in STAGES:
        config[stage]["trainer"] = cpu_trainer(steps, precision)
        config[stage]["checkpoint"] = {"every_n_train_steps": steps}
    config["edge"]["model"]["temperature_every"] = 1
    path = tmp_path / f"{dataset}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# about 50 s each, so with -m slow (the default suite took 922 s on a fresh clone): the three data sets' loaders and
# data checks, the paper configs' check before training and every stage under DDP are tested by the default run
@pytest.mark.slow
@pytest.mark.parametrize("dataset", list(CASES))
def test_every_stage_runs_on_the_fixture(dataset: str, tmp_path: Path) -> None:
    run_dir = run_pipeline(fixture_config(dataset, tmp_path, precision="bf16-mixed"), tmp_path / "run")
    for stage in STAGES:
        ckpt = torch.load(run_dir / stage / "final.ckpt", weights_only=True)
        assert ckpt["global_step"] == 2, stage
    report = (run_dir / "evaluation" / "report.md").read_text()
    assert "hypervolume" in report.lower()


def textbook_overrides(config_path: Path) -> list[str]:
    """The ``--set`` overrides that the comments of the config's ``backbone`` section give."""
    lines = config_path.read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("backbone:")))
    end = next(i for i in range(start + 1, len(lines)) if lines[i][:1] not in (" ", ""))
    comments = " ".join(line.split("#", 1)[1].rstrip(" \\") for line in lines[start:end] if "#" in line)
    words = shlex.split(comments)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--set"]


# pipeline config: the anchor's parameters with the textbook network (docs/datasets.md)
TEXTBOOK = {"nyuv2/pipeline.yaml": 80_144_140, "cifar100/pipeline.yaml": 131_411_300}


@pytest.mark.parametrize("name, params", list(TEXTBOOK.items()))
def test_the_textbook_network_is_the_commented_set_away(name: str, params: int) -> None:
    """The configs default to the network matching the paper's size (tests/test_info.py); the overrides their
    comments give turn it into the backbone class's defaults, the textbook network, of ``params`` parameters."""
    path = ROOT / "configs" / name
    overrides = textbook_overrides(path)
    assert overrides and all(o.startswith("backbone.init_args.") for o in overrides), overrides
    paper = build_backbone_from_config(load_pipeline_config(path).backbone)
    config = load_pipeline_config(path, overrides)
    textbook = build_backbone_from_config(config.backbone)
    assert textbook.config() == type(textbook)().config() != paper.config()
    assert count_parameters(AnchorNet(textbook, build_data(config.data).tasks)) == params


def logged_metrics(run_dir: Path) -> dict[str, float]:
    files = sorted(run_dir.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    rows = list(csv.DictReader(files[-1].open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v not in ("", None)}


@pytest.mark.slow  # 80 s: the default run keeps tests/test_ddp.py's two-process runs of every stage
def test_two_process_ddp_validation_sees_every_sample_once(tmp_path: Path) -> None:
    """Every stage trains under 2-process DDP (gloo) on the PASCAL-Context fixture, and validating the
    anchor on an odd number of images under DDP gives the single-process metrics: no sample is padded in
    twice or dropped."""
    odd_val = lambda root: make_pascal_mt(root, val_ids=[*VAL_IDS, "2008_000019"])  # noqa: E731
    path = fixture_config("pascal_context", tmp_path, steps=2, writer=odd_val)
    config = yaml.safe_load(path.read_text())
    for stage, strategy in (("anchor", "ddp"), ("edge", "ddp"), ("weight", "ddp_find_unused_parameters_true")):
        config[stage]["trainer"].update({"devices": 2, "strategy": strategy})
    path.write_text(yaml.safe_dump(config))
    run_dir = run_pipeline(path, tmp_path / "run", evaluate=False)
    for stage in STAGES:
        assert torch.load(run_dir / stage / "final.ckpt", weights_only=True)["global_step"] == 2, stage

    anchor_config = run_dir / "configs" / "anchor.yaml"
    num_val = len(Path(config["data"]["init_args"]["root"], "ImageSets", "Context", "val.txt").read_text().split())
    assert num_val % 2 == 1, "the fixture needs an odd validation set for this test"
    # one thread per process in both runs (DDP gives each rank cores / ranks threads): a 2-step anchor has
    # streams whose outputs change by 1e-2 with the order of float sums, which is not what is tested here
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    metrics = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        out = tmp_path / f"validate{devices}"
        subprocess.run([sys.executable, "-m", "stages.cli", "anchor", "validate", "--config", str(anchor_config),
                        "--ckpt_path", str(run_dir / "anchor" / "final.ckpt"), f"--trainer.devices={devices}",
                        f"--trainer.strategy={strategy}", f"--trainer.default_root_dir={out}",
                        f"--trainer.logger.init_args.save_dir={out}"], env=env, check=True)
        metrics[devices] = logged_metrics(out)
    single, ddp = metrics[1], metrics[2]
    metric_keys = [k for k in single if not k.startswith("val/loss")]
    assert metric_keys, single
    for key in metric_keys:
        assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
