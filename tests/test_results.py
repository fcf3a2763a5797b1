"""stages/results.py: the typed evaluation, comparison and sweep results (round trips through JSON), lookups that
do not depend on the labels, version-1 files read from their labels, and the refusal of a newer schema."""

from __future__ import annotations

import json
import math
import sys

import pytest

import stages.results as results
from dymu.layout import RunLayout
from stages.compare import static_match
from stages.results import (
    SCHEMA_VERSION,
    CompareKind,
    CompareRow,
    ComparisonResult,
    CostGroup,
    CostSummary,
    EvaluationRecord,
    EvaluationResult,
    Method,
    SchemaError,
    TrialMetrics,
    cost_label,
    with_ratios,
)
from stages.sweep import METRIC_COLUMNS, trial_metrics
from tests.small_scenes import doc_script

TASKS = ("semseg", "depth", "normals")


def record(method: Method = Method.DYMU, adaptation: bool = False, c: float = 0.0, hv: float = 1.0,
           **extra) -> EvaluationRecord:
    prefs = [{"r": [0.2, 0.3, 0.5], "c": c, "architecture": [[0, 1, 2]], "losses": [0.5, 0.6, 0.7], "params": 80,
              "flops": 2e9}]
    return EvaluationRecord(method=method, adaptation=adaptation, c=c, hypervolume=hv, hypervolume_method="exact",
                            uniformity=0.4 + 0.1 * adaptation, mean_params=800.0 - 400 * c, mean_gflops=2.0,
                            preferences=tuple(prefs), **extra)


def evaluation() -> EvaluationResult:
    """A hand-made evaluation: the anchor and dymu (with and without adaptation) at c in {0, 1}, one budget, every
    cost group (the focused one empty)."""
    recs = [record(Method.ANCHOR, False, c, 2.0) for c in (0.0, 1.0)]
    recs += [record(Method.DYMU, a, c, 1.0 + c + 0.2 * a) for a in (False, True) for c in (0.0, 1.0)]
    budgets = [record(Method.DYMU, a, 0.0, 0.8 + 0.1 * a, budget=0.6, budget_metric="params", max_fraction=0.58,
                      mean_fraction=0.5, within_budget=True) for a in (False, True)]
    costs = [CostSummary(CostGroup.ALL, None, 50, 600.0, 1.5), CostSummary(CostGroup.ALL, 0.0, 50, 800.0, 2.0),
             CostSummary(CostGroup.ALL, 1.0, 50, 400.0, 1.0), CostSummary(CostGroup.FOCUSED, 0.0, 0),
             CostSummary(CostGroup.FOCUSED, 1.0, 0), CostSummary(CostGroup.NEAR_UNIFORM, 0.0, 10, 700.0, 1.8),
             CostSummary(CostGroup.NEAR_UNIFORM, 1.0, 10, 300.0, 0.8)]
    grid = [{"preference": "uniform", "params": {"0.0": 900, "0.5": 600, "1.0": 500},
             "architecture": {"0.0": "a", "0.5": "b", "1.0": "c"}, "focus": None},
            {"preference": "focus semseg", "params": {"0.0": 950, "0.5": 700, "1.0": 450},
             "architecture": {"0.0": "a", "0.5": "b", "1.0": "c"}, "focus": "semseg"}]
    anchor_and_budgets = with_ratios([*recs[:2], *budgets])
    return EvaluationResult(tasks=TASKS, reference_point=(1.0, 1.2, 1.4), reference_point_source="configured",
                            num_test_samples=11, anchor={"params": 1000, "gflops": 2.5, "losses": [0.5, 0.6, 0.7]},
                            control_params=123, inference_cost=tuple(costs), controllability=tuple(grid),
                            records=tuple(with_ratios(recs)), budget_records=tuple(anchor_and_budgets[2:]),
                            controller=None, scored={"checkpoint": "weight/final.ckpt"}, plots={"trees": "trees.png"})


def compare_rows() -> list[CompareRow]:
    return [CompareRow(CompareKind.SINGLE_TASK, 2.0, 1.0, None, 1000, 2.5, None, 30.0),
            CompareRow(CompareKind.PHN, 1.1, 0.55, 0.3, 500, 1.0, 9000, 20.0, stored_params=9500),
            CompareRow(CompareKind.PHN_BN, 1.3, 0.65, 0.4, 500, 1.0, 700, 25.0, stored_params=1200),
            CompareRow(CompareKind.STATIC, 1.5, 0.75, 0.35, 500, 1.0, 0, 60.0, networks=3, stored_params=1500),
            *[CompareRow(CompareKind.OURS, 1.0 + c + 0.2 * a, 0.5, 0.45, 800.0 - 400 * c, 2.0, 100 + 20 * a,
                         40.0 + 5 * a, adaptation=a, c=c) for a in (False, True) for c in (0.0, 1.0)]]


def comparison() -> ComparisonResult:
    curve = [{"k": 1, "subsets": 3, "hv_mean": 1.0, "hv_std": 0.1, "seconds_mean": 20.0},
             {"k": 2, "subsets": 3, "hv_mean": 1.3, "hv_std": 0.1, "seconds_mean": 40.0}]
    rows = compare_rows()
    return ComparisonResult(tasks=TASKS, reference_point=(1.0, 1.2, 1.4), preferences=3, rows=tuple(rows),
                            static_curve=curve, records={"phn": [{"r": [1, 0, 0], "losses": [0.1, 0.2, 0.3]}]},
                            static_match=static_match(rows, curve), plot="training_efficiency.png")


def version_1(data: dict) -> dict:
    """``data`` (an evaluation's or a comparison's JSON) as schema version 1 wrote it: no schema_version and no
    structured fields beside the labels; an empty cost group is null."""
    old = json.loads(json.dumps(data))
    del old["schema_version"]
    if "inference_cost" in old:
        old["inference_cost"] = {k: None if v["count"] == 0 else {f: v[f] for f in ("count", "mean_params", "mean_gflops")}
                                 for k, v in old["inference_cost"].items()}
        for row in old["controllability"]:
            del row["focus"]
    for row in old.get("rows", []) if "kind" in str(old.get("rows")) else []:
        for key in ("kind", "adaptation", "c", "networks"):
            row.pop(key, None)
    return old


# --- round trips ----------------------------------------------------------------------------------------------------

def test_the_method_enum_wraps_the_protocols_variants():
    from dymu.evaluation import ADAPTED, ANCHOR, RECALIBRATED, TREE

    assert [Method.of(v) for v in (ANCHOR, TREE, ADAPTED, RECALIBRATED)] == [
        Method.ANCHOR, Method.DYMU, Method.DYMU, Method.RECALIBRATED]
    assert {m.value for m in Method} == {v.method for v in (ANCHOR, TREE, ADAPTED, RECALIBRATED)}


@pytest.mark.parametrize("rec", [record(), record(Method.ANCHOR, c=1.0, hypervolume_ratio=1.0),
                                 record(budget=0.8, budget_metric="flops", max_fraction=0.79, mean_fraction=0.7,
                                        within_budget=True, hypervolume_ratio=0.9)])
def test_evaluation_records_round_trip_with_todays_keys(rec):
    data = json.loads(json.dumps(rec.to_json()))
    assert EvaluationRecord.from_json(data) == rec
    common = ["method", "adaptation", "c", "hypervolume", "hypervolume_method", "hypervolume_ratio", "uniformity",
              "mean_params", "mean_gflops", "preferences"]
    budget = ["budget", "budget_metric", *common, "max_fraction", "mean_fraction", "within_budget"]
    assert list(data) == (budget if rec.budget is not None else common)


@pytest.mark.parametrize("summary", [CostSummary(CostGroup.ALL, None, 5, 60.0, 0.6),
                                     CostSummary(CostGroup.FOCUSED, 1.0, 0),
                                     CostSummary(CostGroup.NEAR_UNIFORM, 0.0, 3, 70.5, 0.7)])
def test_cost_summaries_round_trip(summary):
    data = json.loads(json.dumps(summary.to_json()))
    assert {"group", "c", "count", "mean_params", "mean_gflops"} == set(data)
    assert CostSummary.from_json(data) == summary


def test_the_cost_labels_keep_todays_text():
    labels = {(s.group, s.c): cost_label(s, 3) for s in evaluation().inference_cost}
    assert labels == {(CostGroup.ALL, None): "all", (CostGroup.ALL, 0.0): "c=0", (CostGroup.ALL, 1.0): "c=1",
                      (CostGroup.FOCUSED, 0.0): "focused (max r >= 0.9), c=0",
                      (CostGroup.FOCUSED, 1.0): "focused (max r >= 0.9), c=1",
                      (CostGroup.NEAR_UNIFORM, 0.0): "near-uniform (max r <= 0.50), c=0",
                      (CostGroup.NEAR_UNIFORM, 1.0): "near-uniform (max r <= 0.50), c=1"}
    assert cost_label(CostSummary(CostGroup.NEAR_UNIFORM, 0.0, 1), 5) == "near-uniform (max r <= 0.30), c=0"
    assert CostGroup.FOCUSED.holds(0.9, 3) and not CostGroup.FOCUSED.holds(0.89, 3)
    assert CostGroup.NEAR_UNIFORM.holds(0.5, 3) and not CostGroup.NEAR_UNIFORM.holds(0.51, 3)


def test_compare_rows_round_trip_with_todays_labels():
    rows = compare_rows()
    data = json.loads(json.dumps([r.to_json() for r in rows]))
    assert [CompareRow.from_json(d) for d in data] == rows
    assert [d["method"] for d in data] == ["single-task", "PHN", "PHN-BN", "static (3 networks)",
                                           "ours w/o adaptation, c=0", "ours w/o adaptation, c=1", "ours, c=0",
                                           "ours, c=1"]
    assert list(data[1]) == ["method", "kind", "adaptation", "c", "hypervolume", "hv_ratio", "uniformity", "params",
                             "gflops", "control_params", "stored_params", "train_seconds"]
    assert "stored_params" not in data[0] and data[3]["networks"] == 3


def test_trial_metrics_round_trip_and_name_the_sweeps_columns():
    assert TrialMetrics.names() == list(METRIC_COLUMNS)
    metrics = TrialMetrics(hv_ratio_c0=0.9, params_c0=0.5)
    data = json.loads(json.dumps(metrics.to_json()))
    assert list(data) == list(METRIC_COLUMNS) and math.isnan(data["focused_c0"])
    assert TrialMetrics.from_json(data) == metrics
    assert TrialMetrics.from_json({"hv_ratio_c0": 0.9, "params_c0": 0.5, "retired": 1.0}) == metrics


def test_whole_files_round_trip():
    for result, cls in ((evaluation(), EvaluationResult), (comparison(), ComparisonResult)):
        data = json.loads(json.dumps(result.to_json()))
        assert data["schema_version"] == SCHEMA_VERSION
        assert cls.from_json(data) == result
        assert cls.from_json(data).to_json() == data
    entry = evaluation().to_json()["inference_cost"]["focused (max r >= 0.9), c=0"]
    assert entry == {"group": "focused", "c": 0.0, "count": 0, "mean_params": None, "mean_gflops": None}


def test_version_1_files_are_read_from_their_labels():
    new, old = evaluation(), version_1(evaluation().to_json())
    assert old["inference_cost"]["focused (max r >= 0.9), c=1"] is None and "focus" not in old["controllability"][0]
    read = EvaluationResult.from_json(old)
    assert read.inference_cost == new.inference_cost and read.records == new.records
    assert read.uniform_controllability()["preference"] == "uniform"
    assert trial_metrics(old) == trial_metrics(new)
    old_rows = version_1(comparison().to_json())
    assert "kind" not in old_rows["rows"][0]
    assert ComparisonResult.from_json(old_rows).rows == comparison().rows


# --- lookups by typed fields ------------------------------------------------------------------------------------------

def test_trial_metrics_read_the_typed_fields():
    metrics = trial_metrics(evaluation().to_json())
    expected = {"hv_ratio_c0": 0.6, "hv_ratio_c1": 1.1, "hv_ratio_c0_noadapt": 0.5, "hv_ratio_c1_noadapt": 1.0,
                "uniformity_c0": 0.5, "uniformity_c1": 0.5, "uniformity_anchor": 0.4, "params_c0": 0.8,
                "params_c1": 0.4, "params_ratio": 0.5, "near_uniform_c0": 0.7, "near_uniform_c1": 0.3,
                "uniform_c0": 0.9, "uniform_c1": 0.5}
    assert {k: pytest.approx(v) for k, v in expected.items()} == {k: metrics.value(k) for k in expected}
    assert math.isnan(metrics.focused_c0) and math.isnan(metrics.focused_c1)  # an empty group


def test_lookups_do_not_depend_on_the_labels(monkeypatch):
    plain_metrics = trial_metrics(evaluation().to_json())
    plain_match = static_match(compare_rows(), comparison().static_curve)
    monkeypatch.setattr(results, "cost_label", lambda summary, n: f"cost #{summary.group.name} {summary.c}")
    monkeypatch.setattr(results, "compare_label", lambda row: f"row #{row.kind.name} {row.adaptation} {row.c}")
    data = json.loads(json.dumps(evaluation().to_json()))
    assert "focused (max r >= 0.9), c=0" not in data["inference_cost"] and "cost #FOCUSED 0.0" in data["inference_cost"]
    assert trial_metrics(data) == plain_metrics
    rows = json.loads(json.dumps([row.to_json() for row in compare_rows()]))
    assert "ours, c=0" not in [row["method"] for row in rows]
    assert static_match([CompareRow.from_json(row) for row in rows], comparison().static_curve) == plain_match
    assert plain_match["ours_hypervolume"] == pytest.approx(1.2) and plain_match["static_k"] == 2


# --- the schema version ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, cls", [(evaluation, EvaluationResult), (comparison, ComparisonResult)])
def test_a_newer_schema_is_refused_in_one_line(make, cls, tmp_path):
    data = make().to_json()
    data["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema_version") as err:
        cls.read(path)
    message = str(err.value)
    assert isinstance(err.value, SchemaError) and "\n" not in message
    assert str(path) in message and f"schema_version {SCHEMA_VERSION + 1}" in message and f"({SCHEMA_VERSION})" in message
    with pytest.raises(SchemaError, match="given.json"):
        cls.from_json(data, "given.json")
    data["schema_version"] = "two"
    with pytest.raises(SchemaError, match="positive integer"):
        cls.from_json(data)
    data["schema_version"] = SCHEMA_VERSION
    assert cls.from_json(data) == make()


def test_a_malformed_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "metrics.json"
    data = evaluation().to_json()
    del data["records"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"metrics.json lacks the entry 'records'; delete it and rerun `dymu evaluate`"):
        EvaluationResult.read(path)
    data = comparison().to_json()
    data["rows"][0]["kind"] = "oracle"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is malformed .*'oracle'.*; delete it and rerun `dymu compare`"):
        ComparisonResult.read(path)


# --- docs/scripts/seed_table.py on both versions ----------------------------------------------------------------------

def test_the_seed_table_reads_both_versions(tmp_path, monkeypatch, capsys):
    seed_table = doc_script("seed_table")
    runs = []
    for name, data in (("new", evaluation().to_json()), ("old", version_1(evaluation().to_json()))):
        layout = RunLayout(tmp_path / name)
        layout.metrics.parent.mkdir(parents=True)
        layout.metrics.write_text(json.dumps(data))
        runs.append(str(layout.root))
    monkeypatch.setattr(sys, "argv", ["seed_table.py", *runs, "--common_reference", *runs])
    seed_table.main()
    out = capsys.readouterr().out
    assert "| all | 0.800 ± 0.000 | 0.400 ± 0.000 | 0.500 ± 0.000 |" in out
    assert "| focused, max r >= 0.9 | none among the cost preferences | | |" in out
    assert "| DYMU with BN adaptation | 0.600 ± 0.000 (min 0.600) | 1.100 ± 0.000 (min 1.100) |" in out
    assert "| 0.6 | 0.400 ± 0.000 (min 0.400) | 0.450 ± 0.000 (min 0.450) | 0.500 ± 0.000 | 0.580 | yes |" in out
    # every record's front is the one point (0.5, 0.6, 0.7): 0.5 * 0.6 * 0.7 over the anchor's hypervolume, 2
    assert "| these runs' DYMU, adapted | 0.105 ± 0.000 | 0.105 ± 0.000 | 0.105 ± 0.000 |" in out
