"""The three stages and the runner, end to end on a tiny synthetic configuration."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dymu import DynamicMultiTaskModel, Preference
from stages.cli import entry_point
from stages.pipeline import PipelineConfig
from stages.runner import run_pipeline, run_stage, stage_config
from stages.stage_cli import stage_main

ROOT = Path(__file__).resolve().parent.parent
CSV = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}


def tiny_trainer(steps: int) -> dict:
    return {"max_steps": steps, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "val_check_interval": steps, "check_val_every_n_epoch": None}


def tiny_config(steps: int = 4, logger: dict | None = None) -> dict:
    config = {
        "seed_everything": 0,
        "data": {"class_path": "datamodules.synthetic.SyntheticScenesDataModule",
                 "init_args": {"tasks": ["semseg", "depth", "normals"], "num_train": 32, "num_val": 8,
                               "num_test": 8, "image_size": 16, "batch_size": 8}},
        "backbone": {"class_path": "dymu.backbones.ConvEncoderDecoder",
                     "init_args": {"channels": [4, 6, 8], "strides": [1, 2, 1], "decoder_width": 8,
                                   "low_level_block": 0}},
        "anchor": {"trainer": tiny_trainer(steps), "checkpoint": {"every_n_train_steps": 2}},
        "affinity": {"num_images": 8},
        "edge": {"trainer": tiny_trainer(steps), "model": {"tau": 0.2, "temperature_every": 2,
                                                           "embed_dim": 8, "hidden": 16},
                 "checkpoint": {"every_n_train_steps": 2}},
        "weight": {"trainer": tiny_trainer(steps), "model": {"embed_dim": 8, "hidden": 16},
                   "checkpoint": {"every_n_train_steps": 2}},
        "evaluate": {"num_preferences": 4, "num_cost_preferences": 50},
    }
    if logger is not None:
        config["logger"] = logger
    return config


def write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One full pipeline run (default logger: W&B offline), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write(tiny_config(), tmp / "pipeline.yaml")
    return run_pipeline(cfg, tmp / "run"), cfg


def test_pipeline_writes_every_stage_and_the_report(finished_run):
    run_dir, _ = finished_run
    for stage in ("anchor", "edge", "weight"):
        assert (run_dir / stage / "final.ckpt").is_file()
        assert (run_dir / "configs" / f"{stage}.yaml").is_file()
    assert list((run_dir / "weight").glob("wandb/offline-run-*")), "W&B offline run files are missing"
    affinity = json.loads((run_dir / "affinity.json").read_text())
    assert affinity["tasks"] == ["semseg", "depth", "normals"]
    assert (run_dir / "affinity.png").is_file()
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    kinds = {(r["method"], r["adaptation"], r["c"]) for r in metrics["records"]}
    assert kinds == {(m, a, c) for c in (0.0, 1.0) for m, a in
                     [("single-task anchor", False), ("dymu", False), ("dymu", True)]}
    for record in metrics["records"]:
        assert len(record["preferences"]) == 4
        assert record["hypervolume"] >= 0 and record["hypervolume_method"] == "exact"
        for pref in record["preferences"]:
            assert len(pref["losses"]) == 3 and all(v > 0 for v in pref["losses"])
    assert metrics["inference_cost"]["all"]["count"] == 50
    assert metrics["inference_cost"]["all"]["mean_params"] <= metrics["anchor"]["params"]
    report = (run_dir / "evaluation" / "report.md").read_text()
    assert "hypervolume" in report and "single-task anchor" in report


def test_checkpoints_record_their_parents_and_load_weights_only(finished_run):
    run_dir, _ = finished_run
    anchor = torch.load(run_dir / "anchor" / "final.ckpt", weights_only=True)
    edge = torch.load(run_dir / "edge" / "final.ckpt", weights_only=True)
    weight = torch.load(run_dir / "weight" / "final.ckpt", weights_only=True)
    assert anchor["dymu"]["parent"] is None
    assert edge["dymu"]["parent"]["path"] == str((run_dir / "anchor" / "final.ckpt").resolve())
    from dymu.checkpoint import file_sha256

    assert edge["dymu"]["parent"]["sha256"] == file_sha256(run_dir / "anchor" / "final.ckpt")
    assert weight["dymu"]["parent"]["sha256"] == file_sha256(run_dir / "edge" / "final.ckpt")
    # the anchor is frozen in later stages: its weights are the same tensors in all three files
    key = "model.anchor.streams.0.0.body.0.0.weight"
    assert torch.equal(anchor["state_dict"][key], weight["state_dict"][key])
    assert weight["global_step"] == 4


def test_python_api_on_a_finished_run(finished_run):
    run_dir, _ = finished_run
    model = DynamicMultiTaskModel.from_run(run_dir)
    assert model.tasks == ["semseg", "depth", "normals"]
    x = torch.randn(2, 3, 16, 16)
    r, c = [0.2, 0.5, 0.3], 0.7
    with torch.no_grad():
        out = model(x, r, c)
        static = model.specialize(r, c).eval()(x)
    assert out["semseg"].shape == (2, 4, 16, 16) and out["normals"].shape == (2, 3, 16, 16)
    for name in model.tasks:
        torch.testing.assert_close(static[name], out[name], atol=1e-5, rtol=1e-5)
    cost = model.cost(Preference((0.2, 0.5, 0.3), 0.7))
    assert cost["params"] == sum(p.numel() for p in model.specialize(r, c).parameters())
    assert cost["flops"] > 0
    with pytest.raises(ValueError, match="sum to 1"):
        model(x, [0.5, 0.5, 0.5], 0.1)


def test_rerun_skips_finished_stages_and_refuses_a_changed_config(finished_run, tmp_path, capsys):
    run_dir, cfg = finished_run
    before = (run_dir / "edge" / "final.ckpt").stat().st_mtime_ns
    run_pipeline(cfg, run_dir, evaluate=False)
    assert "skipping" in capsys.readouterr().out
    assert (run_dir / "edge" / "final.ckpt").stat().st_mtime_ns == before
    changed = tiny_config()
    changed["edge"]["model"]["lambda_active"] = 5.0
    with pytest.raises(ValueError, match="edge stage .* different config"):
        run_pipeline(write(changed, tmp_path / "changed.yaml"), run_dir, evaluate=False)


def test_stage_refuses_an_anchor_trained_for_other_tasks(finished_run, tmp_path):
    run_dir, _ = finished_run
    config = yaml.safe_load((run_dir / "configs" / "edge.yaml").read_text())
    config["data"]["init_args"]["tasks"] = ["semseg", "depth", "edges"]
    config["trainer"].update({"default_root_dir": str(tmp_path), "logger": CSV})
    with pytest.raises(ValueError, match="trained for tasks .* but this stage's data has"):
        stage_main("edge", ["fit", "--config", str(write(config, tmp_path / "edge.yaml"))])


def test_stage_refuses_a_backbone_that_differs_from_the_checkpoint(finished_run, tmp_path):
    run_dir, _ = finished_run
    config = yaml.safe_load((run_dir / "configs" / "edge.yaml").read_text())
    config["model"]["backbone"] = {"class_path": "dymu.backbones.ConvEncoderDecoder",
                                   "init_args": {"channels": [4, 6, 10], "strides": [1, 2, 1]}}
    config["trainer"].update({"default_root_dir": str(tmp_path), "logger": CSV})
    with pytest.raises(ValueError, match="was trained with backbone"):
        stage_main("edge", ["fit", "--config", str(write(config, tmp_path / "edge.yaml"))])


def test_missing_parent_checkpoint_names_the_file(tmp_path):
    config = copy.deepcopy(tiny_config())
    stage = {"seed_everything": 0, "data": config["data"],
             "trainer": {**tiny_trainer(2), "default_root_dir": str(tmp_path), "logger": CSV},
             "model": {"anchor_checkpoint": str(tmp_path / "nope.ckpt"), "affinity": str(tmp_path / "a.json")}}
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        stage_main("edge", ["fit", "--config", str(write(stage, tmp_path / "edge.yaml"))])


def test_single_stage_cli_validate_and_info(finished_run, tmp_path, capsys):
    run_dir, cfg = finished_run
    config = yaml.safe_load((run_dir / "configs" / "anchor.yaml").read_text())
    config["trainer"].update({"default_root_dir": str(tmp_path), "logger": CSV})
    cli = stage_main("anchor", ["validate", "--config", str(write(config, tmp_path / "anchor.yaml")),
                       "--ckpt_path", str(run_dir / "anchor" / "final.ckpt")])
    metrics = cli.trainer.callback_metrics
    assert {"val/loss", "val/semseg_mIoU", "val/depth_RMSE", "val/normals_mean_angle"} <= set(metrics)
    assert entry_point(["info", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "N " in out and "anchor_params" in out and "edge_hypernet_params" in out


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    config = tiny_config(steps=200, logger=CSV)
    config["data"]["init_args"].update({"num_train": 16, "batch_size": 4})
    config["anchor"]["checkpoint"] = {"every_n_train_steps": 5}
    cfg = write(config, tmp_path / "pipeline.yaml")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "stages.cli", "run", "--config", str(cfg), "--run_dir", str(run_dir),
               "--no_evaluate"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = run_dir / "anchor" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.is_file() and not (run_dir / "anchor" / "final.ckpt").is_file()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < 200
    # resume the anchor stage the way the runner does (it passes --ckpt_path last.ckpt)
    run_stage("anchor", stage_config(PipelineConfig.parse(config, "test"), "anchor", run_dir.resolve()), run_dir.resolve())
    final = torch.load(run_dir / "anchor" / "final.ckpt", weights_only=True)
    assert final["global_step"] == 200
    logs = sorted((run_dir / "anchor").glob("**/version_*/metrics.csv"))
    with open(logs[-1]) as fh:
        resumed_steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert min(resumed_steps) >= killed_at, "the resumed run started again from step 0"


def test_evaluation_with_recalibrated_batchnorm(finished_run):
    from stages.evaluate import evaluate_run

    run_dir, _ = finished_run
    result = evaluate_run(run_dir, num_preferences=3, num_cost_preferences=10, recalibrate_batches=2)
    recal = [r for r in result["records"] if r["method"] == "dymu, recalibrated BN"]
    assert [r["c"] for r in recal] == [0.0, 1.0] and all(not r["adaptation"] for r in recal)
    plain = {r["c"]: r for r in result["records"] if r["method"] == "dymu" and not r["adaptation"]}
    for rec in recal:  # same trees and costs as without recalibration, other losses
        assert [p["architecture"] for p in rec["preferences"]] == [p["architecture"] for p in plain[rec["c"]]["preferences"]]
        assert rec["mean_params"] == plain[rec["c"]]["mean_params"]
        assert rec["preferences"][0]["losses"] != plain[rec["c"]]["preferences"][0]["losses"]
    assert "dymu, recalibrated BN" in (run_dir / "evaluation" / "report.md").read_text()


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    """The pipeline with the measured controller (the quickstart's edge stage) on the tiny configuration."""
    tmp = tmp_path_factory.mktemp("measured")
    config = tiny_config(logger=CSV)
    config["edge"]["model"] = {"search": "measured", "embed_dim": 8, "hidden": 16, "preference_groups": 4}
    cfg = write(config, tmp / "pipeline.yaml")
    return run_pipeline(cfg, tmp / "run")


def test_measured_controller_pipeline_chooses_every_tree_and_records_its_calibration(measured_run):
    from dymu.checkpoint import load_checkpoint
    from dymu.controller import TIE_TOLERANCE, CostModel, Trees, all_trees, as_parents

    edge = load_checkpoint(measured_run / "edge" / "final.ckpt")
    calibration = edge["dymu"]["calibration"]
    assert calibration["trade_off"] > 0 and calibration["preferences"] == 32
    if calibration["rule"] == "uniform floor":
        assert calibration["uniform_break_even_c"][-1] == pytest.approx(0.9)
    model = DynamicMultiTaskModel.from_run(measured_run)  # the weight stage keeps the controller
    assert model.controller is not None and float(model.controller.supports.sum()) > 0
    assert model.controller.trade_off.item() == pytest.approx(calibration["trade_off"])
    costs = model.node_costs()
    for r in ([1 / 3] * 3, [0.7, 0.2, 0.1]):
        for c in (0.0, 1.0):
            arch = model.architecture(r, c)
            assert arch == model.controller.solve(torch.tensor(r), c, costs)
            # the exact optimum of the controller's objective over every tree
            objective = model.controller.task_objective(torch.tensor(r, dtype=torch.float64))
            cost = CostModel.create(costs)
            trees = all_trees(3, 3)
            values = objective(trees) + model.controller.frugality(c) * cost(trees)
            chosen = Trees(as_parents(arch).unsqueeze(0))
            # within the tie tolerance, which sends near-ties to the cheaper tree
            assert float(objective(chosen)[0] + model.controller.frugality(c) * cost(chosen)[0]) == pytest.approx(
                float(values.min()), abs=TIE_TOLERANCE * max(1.0, abs(float(values.min()))) + 1e-12)


def test_evaluation_with_budgets(measured_run, capsys):
    from stages.cli import entry_point as cli

    assert cli(["evaluate", "--run_dir", str(measured_run), "--num_preferences", "3", "--num_cost_preferences", "10",
                "--budgets", "1,0.8,0.6"]) == 0
    metrics = json.loads((measured_run / "evaluation" / "metrics.json").read_text())
    budgets = metrics["budget_records"]
    assert sorted({(r["budget"], r["adaptation"]) for r in budgets}) == [
        (b, a) for b in (0.6, 0.8, 1.0) for a in (False, True)]
    for rec in budgets:
        assert rec["within_budget"] and rec["max_fraction"] <= rec["budget"] + 1e-9
        assert rec["hypervolume_ratio"] is not None and len(rec["preferences"]) == 3
    assert {(r["method"], r["c"]) for r in metrics["records"]} == {
        (m, c) for m in ("single-task anchor", "dymu") for c in (0.0, 1.0)}  # budgets kept apart
    report = (measured_run / "evaluation" / "report.md").read_text()
    assert "## Budgets" in report and "## Controller" in report and "cost_accuracy.png" in report
    assert (measured_run / "evaluation" / "cost_accuracy.png").is_file()
    assert cli(["evaluate", "--run_dir", str(measured_run), "--budgets", "0.05"]) == 1
    assert "below the cheapest tree" in capsys.readouterr().err


def test_info_prints_the_runs_controller(measured_run, finished_run, capsys):
    from dymu.checkpoint import load_checkpoint

    assert entry_point(["info", "--run_dir", str(measured_run)]) == 0
    out = capsys.readouterr().out
    lam = load_checkpoint(measured_run / "edge" / "final.ckpt")["dymu"]["calibration"]["trade_off"]
    assert f"trade-off lambda        {lam:.4g}" in out and "27 measured paths; 3,159 trees, searched exactly" in out
    assert entry_point(["info", "--run_dir", str(finished_run[0])]) == 0
    assert "Gumbel search (no measured controller)" in capsys.readouterr().out
