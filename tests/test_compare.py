"""`dymu compare` on a tiny run: every row, figure 6, and a rerun that trains nothing new."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dymu.layout import RunLayout
from dymu.metrics import hypervolume
from stages.cli import entry_point
from stages.compare import static_match, static_subset_curve
from stages.results import CompareKind, CompareRow, ComparisonResult
from stages.runner import run_pipeline
from tests.test_pipeline import CSV, tiny_config, tiny_trainer, write

K = 3


def compare_config() -> dict:
    config = tiny_config(steps=2, logger=CSV)
    config["evaluate"] = {"num_preferences": K, "num_cost_preferences": 20}
    for stage in ("shared_mtl", "phn", "phn_bn", "static"):
        config[stage] = {"trainer": tiny_trainer(2)}
    config["phn"]["model"] = {"chunk_size": 500, "chunk_embed_dim": 8, "embed_dim": 8, "hidden": 16}
    config["phn_bn"]["model"] = {"embed_dim": 8, "hidden": 16}
    config["static"]["count"] = K
    return config


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    run_dir = run_pipeline(write(compare_config(), tmp / "pipeline.yaml"), tmp / "run")
    assert entry_point(["compare", "--run_dir", str(run_dir)]) == 0
    return run_dir


def test_compare_writes_every_row_and_figure_6(compared):
    layout = RunLayout(compared)
    result = json.loads(layout.compare_metrics.read_text())
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["single-task", "PHN", "PHN-BN", f"static ({K} networks)", "ours w/o adaptation, c=0",
                       "ours w/o adaptation, c=1", "ours, c=0", "ours, c=1"]
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["PHN"]["control_params"] > rows["PHN-BN"]["control_params"] > 0
    assert rows["PHN"]["params"] == rows["PHN-BN"]["params"] == rows[f"static ({K} networks)"]["params"]
    assert all(row["train_seconds"] is not None and row["train_seconds"] > 0 for row in result["rows"])
    assert len(result["records"]["static"]) == K and len(result["records"]["phn"]) == K
    # the static networks are scored at the preferences they were trained for: the evaluation's
    ours = json.loads(layout.metrics.read_text())
    eval_rs = [p["r"] for p in next(r for r in ours["records"] if r["method"] == "dymu")["preferences"]]
    np.testing.assert_allclose([rec["r"] for rec in result["records"]["static"]], eval_rs)
    # the table's hypervolume is the front of the records, against the evaluation's reference point
    phn = result["records"]["phn"]
    assert rows["PHN"]["hypervolume"] == pytest.approx(
        hypervolume(np.array([r["losses"] for r in phn]), np.array(ours["reference_point"])))
    assert [p["k"] for p in result["static_curve"]] == list(range(1, K + 1))
    assert layout.compare_plot.is_file() and "| PHN-BN |" in layout.compare_report.read_text()
    # the rows' typed fields beside their labels; the file reads back as it was written
    assert [(row["kind"], row["adaptation"], row["c"]) for row in result["rows"]] == [
        ("single-task", None, None), ("phn", None, None), ("phn_bn", None, None), ("static", None, None),
        ("ours", False, 0.0), ("ours", False, 1.0), ("ours", True, 0.0), ("ours", True, 1.0)]
    typed = ComparisonResult.read(layout.compare_metrics)
    assert typed.to_json() == result and typed.row(CompareKind.STATIC).networks == K
    assert result["static_match"]["ours_hypervolume"] == typed.row(CompareKind.OURS, True, 0.0).hypervolume


def test_rerunning_compare_trains_nothing(compared, capsys):
    layout = RunLayout(compared)
    finals = {p: p.stat().st_mtime_ns for p in compared.rglob("final.ckpt")}
    assert len(finals) == 3 + 3 + K  # anchor, edge, weight; shared_mtl, phn, phn_bn; K static networks
    capsys.readouterr()
    assert entry_point(["compare", "--run_dir", str(compared)]) == 0
    out = capsys.readouterr().out
    assert ": training" not in out and "resuming" not in out
    assert {p: p.stat().st_mtime_ns for p in compared.rglob("final.ckpt")} == finals
    assert layout.compare_report.is_file()


def test_compare_refuses_a_run_without_baseline_settings(tmp_path, capsys):
    config = tiny_config(steps=2, logger=CSV)
    run_dir = tmp_path / "run"
    (run_dir / "configs").mkdir(parents=True)
    write(config, RunLayout(run_dir).pipeline_config)
    assert entry_point(["compare", "--run_dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "no trainer settings for the stages" in err and "--baselines_from" in err
    assert not (run_dir / "anchor").exists()


def test_static_match_compares_ours_with_the_networks_that_reach_it_or_with_all_of_them():
    curve = [{"k": 1, "hv_mean": 0.4, "seconds_mean": 10.0}, {"k": 2, "hv_mean": 0.7, "seconds_mean": 20.0},
             {"k": 3, "hv_mean": 0.9, "seconds_mean": 30.0}]

    def match(hv, seconds):
        row = CompareRow(CompareKind.OURS, adaptation=True, c=0.0, hypervolume=hv, hv_ratio=None, uniformity=None,
                         params=1.0, gflops=0.1, control_params=0, train_seconds=seconds)
        return static_match([row], curve)

    reached = match(0.6, 15.0)  # two networks reach 0.6 in 20 s: ours (15 s) is first
    assert (reached["static_k"], reached["static_seconds"], reached["ours_first"]) == (2, 20.0, True)
    assert match(0.6, 25.0)["ours_first"] is False
    above = match(0.95, 25.0)  # all three stay below ours: ours against all of them (30 s)
    assert (above["static_k"], above["ours_first"]) == (None, True)
    assert match(0.95, 35.0)["ours_first"] is False
    assert match(0.6, None)["ours_first"] is None


def test_static_subset_curve_against_a_hand_count():
    losses = [[1.0, 3.0], [3.0, 1.0], [2.0, 2.0]]
    curve = static_subset_curve(losses, [10.0, 20.0, 30.0], [4.0, 4.0], subsets=10)
    # k = 1: each point alone spans (4-1)(4-3) = 3, (4-3)(4-1) = 3, (4-2)(4-2) = 4
    assert curve[0]["subsets"] == 3 and curve[0]["hv_mean"] == pytest.approx(10 / 3)
    assert curve[0]["seconds_mean"] == pytest.approx(20.0)
    # k = 3, the staircase: x in [1, 2) height 4-3 = 1, [2, 3) height 4-2 = 2, [3, 4) height 4-1 = 3: 6
    assert curve[2]["hv_mean"] == pytest.approx(6.0) and curve[2]["hv_std"] == 0.0
    assert curve[2]["seconds_mean"] == pytest.approx(60.0)
    assert static_subset_curve(losses, [10.0, None, 30.0], [4.0, 4.0])[2]["seconds_mean"] is None


# ------------------------------------------------------------------ the architecture evaluation (tables 5 and 7)


def architectures_config() -> dict:
    config = compare_config()
    config["ltb"] = {"trainer": tiny_trainer(2)}
    config["bmtas"] = {"trainer": tiny_trainer(2), "data": {"batch_size": 4}}  # its 20 % split holds 6 samples
    config["feature_partitioning"] = {"trainer": tiny_trainer(2), "model": {
        "search_budget": 2, "es_directions": 1, "distill_steps": 2, "search_batches": 1, "score_batches": 1}}
    config["retrain"] = {"trainer": tiny_trainer(2)}
    return config


@pytest.fixture(scope="module")
def architectures_compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("architectures")
    run_dir = run_pipeline(write(architectures_config(), tmp / "pipeline.yaml"), tmp / "run")
    assert entry_point(["compare", "--run_dir", str(run_dir), "--methods", "phn", "--architectures"]) == 0
    return run_dir


@pytest.mark.slow
def test_compare_architectures_writes_every_row(architectures_compared):
    from dymu.baselines.ltb import found_architecture
    from dymu.metrics import delta_m
    from dymu.model import DynamicMultiTaskModel

    layout = RunLayout(architectures_compared)
    result = json.loads(layout.compare_metrics.read_text())
    table = result["architectures"]
    methods = [row["method"] for row in table["rows"]]
    assert methods == ["single-task", "LTB", "LTB †", "BMTAS", "BMTAS †", "feature partitioning", "ours, c=0",
                       "ours †, c=0", "ours, c=1", "ours †, c=1"]
    assert table["tasks"] == ["semseg", "depth", "normals"] and table["metric_names"] == ["mIoU", "RMSE", "mean_angle"]
    assert table["higher_is_better"] == [True, False, False]
    rows = {row["method"]: row for row in table["rows"]}
    single = rows["single-task"]
    lower = [not h for h in table["higher_is_better"]]
    for row in table["rows"][1:]:
        assert len(row["metrics"]) == len(row["losses"]) == 3 and all(np.isfinite(row["metrics"]))
        assert row["delta_m_percent"] == pytest.approx(100 * delta_m(row["metrics"], single["metrics"], lower))
        assert row["params_change_percent"] == pytest.approx(100 * (row["params"] / single["params"] - 1))
        assert row["params"] <= single["params"]  # a tree uses at most the anchor's nodes
    # the retrained trees are the parents' trees: ours at the uniform preference, LTB's and BMTAS's found trees
    model = DynamicMultiTaskModel.from_checkpoint(layout.final("edge"))
    for c in (0.0, 1.0):
        tree = model.architecture([1 / 3] * 3, c).to_list()
        assert rows[f"ours, c={c:g}"]["tree"] == rows[f"ours †, c={c:g}"]["tree"] == tree
    for stage, label in (("ltb", "LTB"), ("bmtas", "BMTAS")):
        assert rows[label]["tree"] == rows[f"{label} †"]["tree"] == found_architecture(layout.final(stage)).to_list()
    # one tree, two inits: the same network size, different weights, so different test metrics
    assert rows["ours, c=0"]["params"] == rows["ours †, c=0"]["params"]
    assert rows["ours, c=0"]["metrics"] != rows["ours †, c=0"]["metrics"]
    report = layout.compare_report.read_text()
    assert "## Architecture evaluation (tables 5 and 7)" in report and "| PHN |" in report
    assert all(f"| {method} |" in report for method in methods)
