"""``dymu sweep --batch_trials K`` (stages.batched_sweep): K = 3 trials trained in one process give each trial the
files, hypernets and metrics of the same trial run alone with ``seeded_sampling: true``; a rerun skips them and the
runner's lineage checks accept them; what cannot be batched runs alone after a note.

The trials differ in tau, lambda_inactive, the Gumbel temperature, the edge learning rate and the seed (so in their
preferences, noise and batch order). Float32 on CPU: the batched anchor runs the three trials' batches as one
batch, so its convolutions may sum in another order than a run alone; after the tiny config's 4 steps per stage the
hypernets agree to ``TOL`` (measured max difference about 1e-7), while any two different trials differ by far more
(checked: a batching that mixed the trials up would fail).
"""

import json
import shutil

import pytest

from dymu.checkpoint import META_KEY, load_checkpoint, submodule_state
from dymu.model import DynamicMultiTaskModel
from stages.batched_sweep import PendingTrial, batch_problem, group_key
from stages.lineage import LINEAGE_KEY
from stages.runner import run_pipeline
from stages.sweep import load_sweep, plan_trials, prepare_trial, run_sweep, run_trial, trial_name
from tests.test_pipeline import tiny_config, write

TOL = 1e-5
pytestmark = pytest.mark.slow  # about 70 s: a parent run, a batched group and three trials alone

SWEEP = {"method": "random", "parameters": {  # three draws: the trials differ in every one of these
    "edge.model.tau": {"min": 0.1, "max": 0.4},
    "edge.model.lambda_inactive": {"min": 0.0, "max": 0.5},
    "edge.model.temperature": {"min": 1.0, "max": 5.0},
    "edge.model.optimizer.init_args.lr": {"min": 0.002, "max": 0.03, "distribution": "log_uniform_values"},
    "weight.model.optimizer.init_args.lr": {"min": 0.001, "max": 0.01, "distribution": "log_uniform_values"},
    "seed_everything": {"min": 0, "max": 1000},
    "edge.model.preference_groups": {"value": 2},
    "edge.model.loss_scales": {"value": "anchor"},
}}


def hypernet_state(path, part):
    return submodule_state(load_checkpoint(path)["state_dict"], f"model.{part}_hypernet")


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same parent run twice: one for the batched sweep, one for the trials alone."""
    tmp = tmp_path_factory.mktemp("batched")
    config = tiny_config()
    config["edge"]["model"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.02}}
    config["weight"]["model"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}
    config["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "."}}
    batched = run_pipeline(write(config, tmp / "pipeline.yaml"), tmp / "batched", stages=("affinity",))
    alone = tmp / "alone"
    shutil.copytree(batched, alone)
    sweep = write(SWEEP, tmp / "s.yaml")
    plan = plan_trials(load_sweep(sweep), trials=3)
    results = run_sweep(sweep, batched, trials=3, batch_trials=3)
    singles = [run_trial(alone, params, seeded=True) for params in plan]
    return batched, alone, sweep, plan, results, singles


def test_a_batched_trial_equals_the_trial_run_alone(runs):
    batched, alone, _, plan, results, singles = runs
    assert [r["name"] for r in results] == [trial_name(p) for p in plan] == [r["name"] for r in singles]
    for res, single in zip(results, singles):
        b, a = batched / "sweeps" / res["name"], alone / "sweeps" / res["name"]
        for stage in ("edge", "weight"):
            diff = max_difference(hypernet_state(b / stage / "final.ckpt", stage),
                                  hypernet_state(a / stage / "final.ckpt", stage))
            assert diff <= TOL, f"{res['name']} {stage}: max difference {diff}"
            print(f"{res['name']} {stage}: max difference {diff:.3g}")
            mb, ma = load_checkpoint(b / stage / "final.ckpt"), load_checkpoint(a / stage / "final.ckpt")
            for key in ("stage", "model", "tasks"):
                assert mb[META_KEY][key] == ma[META_KEY][key], key
            assert mb[META_KEY]["loss_scales"] == pytest.approx(ma[META_KEY]["loss_scales"], rel=1e-6)
            assert mb[META_KEY]["parent"]["stage"] == ma[META_KEY]["parent"]["stage"]
            assert json.dumps(mb["hyper_parameters"], sort_keys=True).replace(str(batched), "") == json.dumps(
                ma["hyper_parameters"], sort_keys=True).replace(str(alone), "")
            assert mb[LINEAGE_KEY]["stage"] == stage and set(mb[LINEAGE_KEY]["parents"]) == set(
                ma[LINEAGE_KEY]["parents"])
            missing = set(ma) - set(mb) - {"loops"}  # Lightning's loop state: a batched stage has no such loop
            assert not missing, missing
            assert (b / "configs" / f"{stage}.yaml").read_text().replace(str(batched), "") == (
                a / "configs" / f"{stage}.yaml").read_text().replace(str(alone), "")
        assert res["metrics"].keys() == single["metrics"].keys()
        for key, value in single["metrics"].items():
            assert res["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
        assert json.loads((b / "trial.json").read_text()) == res
        model = DynamicMultiTaskModel.from_run(b)
        assert model.weight_hypernet is not None and model.edge_hypernet is not None


def test_different_trials_differ_beyond_the_tolerance(runs):
    """The comparison above can fail: every pair of different trials differs by far more than TOL in both stages
    (so trials mixed up, or sharing noise, preferences or batches, would not pass)."""
    batched, alone, _, _, results, _ = runs
    names = [r["name"] for r in results]
    for stage in ("edge", "weight"):
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                diff = max_difference(hypernet_state(batched / "sweeps" / x / stage / "final.ckpt", stage),
                                      hypernet_state(alone / "sweeps" / y / stage / "final.ckpt", stage))
                assert diff > 100 * TOL, (stage, x, y, diff)


def test_batched_trials_are_skipped_on_rerun_and_accepted_by_the_runner(runs, capsys):
    batched, _, sweep, plan, results, _ = runs
    stamps = {p: p.stat().st_mtime_ns for p in (batched / "sweeps").glob("*/*/final.ckpt")}
    assert len(stamps) == 6
    capsys.readouterr()
    again = run_sweep(sweep, batched, trials=3, batch_trials=3)
    assert capsys.readouterr().out.count("finished, skipping") == 3 and again == results
    # the stages run alone (dymu trial, the runner's lineage and config checks) accept the batched checkpoints
    result = run_trial(batched, plan[0], seeded=True)
    out = capsys.readouterr().out
    assert out.count("finished checkpoint") == 2 and "training" not in out
    assert result["metrics"] == pytest.approx(results[0]["metrics"], nan_ok=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_what_cannot_be_batched_is_named(runs):
    batched, _, _, plan, _, _ = runs
    trial = prepare_trial(batched, {**plan[0], "edge.model.search": "measured"}, "x", seeded=True)
    assert "search is 'measured'" in batch_problem(trial)
    trial = prepare_trial(batched, {**plan[0], "weight.model.seeded_sampling": False}, "x", seeded=True)
    assert "seeded_sampling is false" in batch_problem(trial)
    trial = prepare_trial(batched, plan[0], "x", seeded=True)
    assert batch_problem(trial) is None
    other = prepare_trial(batched, {**plan[0], "edge.model.embed_dim": 4}, "y", seeded=True)
    assert group_key(other) != group_key(trial) == group_key(prepare_trial(batched, plan[1], "z", seeded=True))
    sched = PendingTrial(0, "s", {}, trial.config, {**trial.configs, "edge": {
        **trial.configs["edge"], "trainer": {**trial.configs["edge"]["trainer"], "gradient_clip_val": 1.0}}},
        trial.layout)
    assert "gradient_clip_val" in batch_problem(sched)


def test_seeded_sampling_is_off_by_default():
    import inspect

    from lightning_modules.edge import EdgeHypernetSearch
    from lightning_modules.weight import WeightHypernetAdaptation

    for cls in (EdgeHypernetSearch, WeightHypernetAdaptation):
        assert inspect.signature(cls).parameters["seeded_sampling"].default is False
