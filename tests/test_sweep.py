"""Sweeps: the sweep files, the local plan (deterministic, resumable), trials on a parent's anchor, and the
agreement between a sweep file and the command it generates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dymu.checkpoint import META_KEY, load_checkpoint
from dymu.evaluation import mean_task_losses
from dymu.model import DynamicMultiTaskModel
from dymu.tasks import tasks_from_config
from stages.common import build_data, read_yaml
from stages.pipeline import load_pipeline_config
from stages.runner import run_pipeline
from stages.sweep import (
    METRIC_COLUMNS,
    agent_arguments,
    check_trial,
    load_sweep,
    parse_trial_arguments,
    plan_trials,
    representative_trials,
    run_sweep,
    trial_config,
    trial_main,
    trial_name,
)
from tests.test_pipeline import tiny_config, write

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "configs" / "sweeps").rglob("*.yaml")) + sorted((ROOT / "docs" / "sweeps").rglob("*.yaml"))


def test_every_shipped_sweep_file_is_valid_and_its_command_accepts_every_parameter():
    assert ROOT / "configs" / "sweeps" / "tau_lambda.yaml" in SWEEPS
    quickstart = load_pipeline_config(ROOT / "configs" / "quickstart.yaml")
    for path in SWEEPS:
        sweep = load_sweep(path)
        for params in representative_trials(plan_trials(sweep, trials=50)):  # every value of every key
            # what a W&B agent passes as ${args} (f"--{key}={value}", Python's str of the value), parsed as
            # `dymu trial` parses it, gives the same values ...
            assert parse_trial_arguments([f"--{k}={v}" for k, v in params.items()]) == params
            assert parse_trial_arguments(agent_arguments(params)) == params
            # ... and a valid pipeline config whose swept entries hold them
            config = trial_config(quickstart, params)
            for key, value in params.items():
                node = config.values
                for part in key.split("."):
                    node = node[part]
                assert node == value, (path, key)


def test_the_wandb_command_calls_dymu_trial_with_args():
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "tau_lambda.yaml")
    command = sweep.command
    assert command[command.index("dymu") + 1] == "trial" and "${args}" in command
    assert {"edge.model.tau", "edge.model.lambda_active", "edge.model.lambda_inactive"} <= set(sweep.parameters)
    assert sweep.metric.name in METRIC_COLUMNS


def test_grid_plan_is_every_combination_in_file_order(tmp_path):
    path = tmp_path / "s.yaml"  # in this order, not sorted
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"edge.model.tau": {"values": [0.1, 0.2]},
                                                                     "edge.model.lambda_active": {"values": [1, 3, 5]},
                                                                     "seed_everything": {"value": 4}}}, sort_keys=False))
    sweep = load_sweep(path)
    plan = plan_trials(sweep)
    assert len(plan) == 6
    assert plan[0] == {"edge.model.tau": 0.1, "edge.model.lambda_active": 1, "seed_everything": 4}
    assert plan[1]["edge.model.lambda_active"] == 3 and plan[3]["edge.model.tau"] == 0.2
    assert plan_trials(sweep, trials=2) == plan[:2]


def test_random_plan_is_deterministic_and_within_its_ranges(tmp_path):
    sweep = load_sweep(write({"method": "random", "parameters": {
        "edge.model.tau": {"min": 0.05, "max": 0.3},
        "edge.model.lambda_active": {"min": 0.01, "max": 10.0, "distribution": "log_uniform_values"},
        "edge.model.preference_groups": {"values": [1, 4, 8]}}}, tmp_path / "s.yaml"))
    a, b = plan_trials(sweep, trials=20, seed=3), plan_trials(sweep, trials=20, seed=3)
    assert a == b and a != plan_trials(sweep, trials=20, seed=4)
    assert all(0.05 <= p["edge.model.tau"] <= 0.3 and 0.01 <= p["edge.model.lambda_active"] <= 10 for p in a)
    assert {p["edge.model.preference_groups"] for p in a} <= {1, 4, 8}
    assert len({trial_name(p) for p in a}) == 20


@pytest.mark.parametrize("bad, message", [
    ({"anchor.model.stream_init": {"values": ["shared"]}}, "cannot sweep 'anchor.model.stream_init'"),
    ({"data.init_args.batch_size": {"values": [8]}}, "cannot sweep"),
    ({"edge.model.tau": {"min": 0.1}}, "needs 'values"),
    ({"edge.model.tau": {"values": []}}, "non-empty list"),
    ({"edge.model.tau": {"values": [0.1], "distribution": "normal"}},
     "parameter 'edge.model.tau': key 'distribution': expected one of 'uniform', 'int_uniform', 'log_uniform_values', "
     "got normal"),
    ({"edge.model.tau": {"vals": [0.1]}}, "vals"),
    ({"edge.model.tau": {"min": 0.1, "max": 0.2}}, "grid search needs 'values'"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, bad, message):
    path = write({"method": "grid", "parameters": bad}, tmp_path / "s.yaml")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_sweep(path)
    for entry, message in (({"method": "grdi"}, "key 'method': expected one of 'grid', 'random', 'bayes', got grdi"),
                           ({"metric": {"name": "hv"}}, "metric"), ({"run_cap": 0}, "key 'run_cap'")):
        path = write({"parameters": {"edge.model.tau": {"values": [0.1]}}, **entry}, tmp_path / "s.yaml")
        with pytest.raises(ValueError, match=re.escape(message)):
            load_sweep(path)


def test_representative_trials_hold_every_value_of_every_key():
    plan = [{"a": a, "b": b, "c": 0} for a in (1, 2, 3) for b in ("x", "y")]
    chosen = representative_trials(plan)
    assert chosen[0] == plan[0] and len(chosen) == 4  # greedy, in plan order: (1, x), (1, y), (2, x), (3, x)
    assert {(k, v) for p in chosen for k, v in p.items()} == {(k, v) for p in plan for k, v in p.items()}


def test_a_misspelt_swept_key_is_refused_before_anything_trains(tmp_path):
    """The trial's keys are checked by the pipeline parser and the stage's LightningCLI, from the sweep file or
    from the W&B agent's arguments, before any training."""
    quickstart = load_pipeline_config(ROOT / "configs" / "quickstart.yaml")
    config = trial_config(quickstart, parse_trial_arguments(["--edge.model.tua=0.2"]))
    with pytest.raises(ValueError, match=re.escape("unknown key 'edge.model.tua'")):
        check_trial(tmp_path, config, "t")
    with pytest.raises(ValueError, match=re.escape("unknown key 'edge.modle'")):
        trial_config(quickstart, {"edge.modle.tau": 0.2})
    sweep = write({"parameters": {"edge.model.lamda_active": {"values": [1.0]}}}, tmp_path / "s.yaml")
    with pytest.raises(ValueError, match=re.escape("unknown key 'edge.model.lamda_active'")):
        run_sweep(sweep, tmp_path / "run", config_path=str(ROOT / "configs" / "quickstart.yaml"))
    assert not (tmp_path / "run" / "anchor").exists()


def test_trial_arguments_accept_wandb_forms_and_refuse_typos():
    assert parse_trial_arguments(["--edge.model.tau=0.2", "edge.model.lambda_inactive=0.01"]) == {
        "edge.model.tau": 0.2, "edge.model.lambda_inactive": 0.01}
    # Python's str() of 1e-05, None and False, as W&B writes them
    assert parse_trial_arguments(["--edge.model.lambda_inactive=1e-05", "--edge.model.temperature_every=None",
                                  "--edge.model.use_affinity=False"]) == {
        "edge.model.lambda_inactive": 1e-05, "edge.model.temperature_every": None, "edge.model.use_affinity": False}
    with pytest.raises(ValueError, match="must look like"):
        parse_trial_arguments(["--edge.model.tau"])


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    config = tiny_config()
    config["edge"]["model"]["temperature_every"] = None
    cfg = write(config, tmp / "pipeline.yaml")
    return run_pipeline(cfg, tmp / "run", stages=("affinity",))


def test_local_sweep_trains_trials_on_the_parents_anchor_and_resumes(parent_run, tmp_path, capsys):
    anchor = parent_run / "anchor" / "final.ckpt"
    anchor_mtime = anchor.stat().st_mtime_ns
    sweep = write({"method": "grid", "metric": {"name": "hv_ratio_c0", "goal": "maximize"},
                   "parameters": {"edge.model.lambda_inactive": {"values": [0.0, 0.5]},
                                  "edge.model.preference_groups": {"value": 4},
                                  "edge.model.loss_scales": {"value": "anchor"},
                                  "seed_everything": {"values": [0, 1]}}}, tmp_path / "s.yaml")
    results = run_sweep(sweep, parent_run, trials=2)  # lambda_inactive 0 with seeds 0 and 1
    assert len(results) == 2 and anchor.stat().st_mtime_ns == anchor_mtime
    assert not (parent_run / "edge").exists(), "a trial must not train the parent's own stages"
    for res in results:
        trial = parent_run / "sweeps" / res["name"]
        edge = yaml.safe_load((trial / "configs" / "edge.yaml").read_text())
        assert edge["model"]["anchor_checkpoint"] == str(anchor.resolve())
        assert edge["model"]["lambda_inactive"] == res["parameters"]["edge.model.lambda_inactive"]
        assert edge["model"]["seed"] == edge["seed_everything"] == res["parameters"]["seed_everything"]
        assert (trial / "weight" / "final.ckpt").is_file() and (trial / "evaluation" / "metrics.json").is_file()
        assert set(res["metrics"]) == set(METRIC_COLUMNS)
        # the edge stage trained with 1 / L_t(anchor) on the validation set, recorded in its checkpoint
        meta = load_checkpoint(trial / "edge" / "final.ckpt")[META_KEY]
        model = DynamicMultiTaskModel.from_checkpoint(anchor)
        data = build_data(read_yaml(trial / "configs" / "pipeline.yaml")["data"])
        data.setup("fit")
        val = mean_task_losses(model.anchor, data.val_dataloader(), tasks_from_config(meta["tasks"]))
        assert meta["loss_scales"] == pytest.approx((1.0 / val).tolist(), rel=1e-5)
        assert 0 < res["metrics"]["params_c0"] <= 1 and res["metrics"]["hv_ratio_c0"] > 0
    summary = (parent_run / "sweeps" / "summary.csv").read_text().splitlines()
    assert (parent_run / "sweeps" / "summary_s.csv").read_text().splitlines() == summary
    assert len(summary) == 3 and summary[0].startswith("trial,edge.model.lambda_inactive")
    md = (parent_run / "sweeps" / "summary.md").read_text()
    assert "Mean and spread over seeds" in md and "| 2 |" in md  # lambda_inactive=0 has seeds 0 and 1
    # a rerun skips the finished trials and trains only the new one
    stamps = {r["name"]: (parent_run / "sweeps" / r["name"] / "trial.json").stat().st_mtime_ns for r in results}
    capsys.readouterr()
    again = run_sweep(sweep, parent_run, trials=3)
    out = capsys.readouterr().out
    assert len(again) == 3 and out.count("finished, skipping") == 2
    for name, stamp in stamps.items():
        assert (parent_run / "sweeps" / name / "trial.json").stat().st_mtime_ns == stamp
    assert [r["name"] for r in again[:2]] == [r["name"] for r in results]
    assert json.loads((parent_run / "sweeps" / again[2]["name"] / "trial.json").read_text())["parameters"] == {
        "edge.model.lambda_inactive": 0.5, "edge.model.preference_groups": 4, "edge.model.loss_scales": "anchor",
        "seed_everything": 0}


def test_trial_command_needs_a_parent_with_an_anchor(tmp_path, capsys):
    assert trial_main(["--run_dir", str(tmp_path), "--edge.model.tau=0.2"]) == 1
    assert "needs a trained anchor" in capsys.readouterr().err
