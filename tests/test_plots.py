"""``dymu evaluate``'s figures (stages/plots.py) and the hypervolume ratio of its report, on untrained models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dymu.backbones import ConvEncoderDecoder
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.search_space import Architecture
from dymu.tasks import make_task
from stages.evaluate import render_report, with_hypervolume_ratios
from stages.plots import (
    PLOT_FILES,
    cost_accuracy_points,
    edge_pairs,
    edge_usage,
    marginal_series,
    plot_cost_accuracy,
    plot_marginal_controllability,
    plot_resource_usage,
    simplex_grid,
    simplex_usage,
    write_plots,
)
from stages.results import CompareKind, CompareRow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASK_KINDS = [("semseg", {"out_channels": 3}), ("depth", {}), ("normals", {}), ("edges", {})]


def tiny_model(n_tasks: int = 3, seed: int = 0) -> DynamicMultiTaskModel:
    """An untrained model whose edge hypernet heads are randomised so that trees vary with (r, c)."""
    torch.manual_seed(seed)
    tasks = [make_task(kind, **kw) for kind, kw in TASK_KINDS[:n_tasks]]
    backbone = ConvEncoderDecoder(channels=(4, 6, 8), strides=(1, 2, 2), decoder_width=8)
    model = DynamicMultiTaskModel.build(backbone, tasks, edge={"embed_dim": 8, "hidden": 16},
                                        weight={"embed_dim": 8, "hidden": 16}, input_shape=(3, 8, 8))
    for head in model.edge_hypernet.heads:
        torch.nn.init.normal_(head.weight, std=2.0)
    return model.eval()


def direct_fraction(model: DynamicMultiTaskModel, r, c: float) -> float:
    anchor = model.node_costs().cost(Architecture.anchor(model.n_tasks, model.anchor.n_layers))["params"]
    return model.cost(Preference.create(r, c, normalize=True))["params"] / anchor


def assert_png(path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes


@pytest.fixture(scope="module")
def model3() -> DynamicMultiTaskModel:
    return tiny_model(3)


def test_simplex_grid_is_the_barycentric_lattice():
    grid = simplex_grid(3, 30)
    assert grid.shape == (math.comb(32, 2), 3) == (496, 3)
    assert np.allclose(grid.sum(axis=1), 1.0) and (grid >= 0).all()
    assert len({tuple(np.round(p * 30).astype(int)) for p in grid}) == len(grid)
    for t in range(3):  # the corners are on the lattice
        assert any(np.array_equal(p, np.eye(3)[t]) for p in grid)
    assert simplex_grid(4, 3).shape == (math.comb(6, 3), 4)
    with pytest.raises(ValueError, match="resolution >= 1"):
        simplex_grid(3, 0)


def test_simplex_usage_matches_direct_cost_calls(model3):
    rng = np.random.default_rng(0)
    seen = set()
    for c in (0.0, 0.5, 1.0):
        rs, frac = simplex_usage(model3, c, resolution=12)
        assert rs.shape == (math.comb(14, 2), 3) and frac.shape == (len(rs),)
        assert ((frac > 0) & (frac <= 1.0 + 1e-12)).all()
        corners = [int(np.flatnonzero((rs == np.eye(3)[t]).all(axis=1))[0]) for t in range(3)]
        for i in [*corners, *rng.choice(len(rs), 6, replace=False)]:
            assert frac[i] == pytest.approx(direct_fraction(model3, rs[i], c), abs=1e-12)
        seen.update(np.round(frac, 9).tolist())
    assert len(seen) > 1, "the randomised hypernet should give trees of different sizes"


def test_triangle_plot_is_written(model3, tmp_path):
    path = plot_resource_usage(model3, tmp_path / "usage.png", resolution=10)
    assert path == tmp_path / "usage.png"
    assert_png(path)


@pytest.mark.parametrize("n_tasks", [2, 4])
def test_edge_usage_and_plot_for_other_task_counts(n_tasks, tmp_path):
    model = tiny_model(n_tasks, seed=1)
    pairs, t, frac = edge_usage(model, 0.5, points=9)
    assert pairs == edge_pairs(n_tasks) == [(i, j) for i in range(n_tasks) for j in range(i + 1, n_tasks)]
    assert frac.shape == (len(pairs), 9) and t[0] == 0.0 and t[-1] == 1.0
    for p, (i, j) in enumerate(pairs):
        for k in (0, 4, 8):
            r = np.zeros(n_tasks)
            r[i], r[j] = t[k], 1.0 - t[k]
            assert frac[p, k] == pytest.approx(direct_fraction(model, r, 0.5), abs=1e-12)
    assert_png(plot_resource_usage(model, tmp_path / "usage.png", edge_points=9))


def test_edge_pairs_are_capped():
    assert len(edge_pairs(6)) == 10 and edge_pairs(6)[:3] == [(0, 1), (0, 2), (0, 3)]
    assert edge_pairs(3, max_pairs=2) == [(0, 1), (0, 2)]


def hand_result(n_tasks: int = 3, anchor_hv: float = 2.0) -> dict:
    """A result dict shaped like ``evaluate_run``'s: the anchor and dymu records at c in {0, 1}."""
    rng = np.random.default_rng(1)
    tasks = [f"task{t}" for t in range(n_tasks)]
    anchor_losses = [0.5 + 0.1 * t for t in range(n_tasks)]
    records = []
    for c in (0.0, 1.0):
        prefs = rng.dirichlet(np.ones(n_tasks), size=5)
        records.append({"method": "single-task anchor", "adaptation": False, "c": c, "hypervolume": anchor_hv,
                        "hypervolume_method": "exact", "uniformity": 0.9, "mean_params": 100.0,
                        "mean_gflops": 1.0, "preferences": [{"r": r.tolist(), "losses": anchor_losses}
                                                            for r in prefs]})
        for adapt in (False, True):
            recs = [{"r": r.tolist(), "losses": (1.0 - 0.5 * r + c + 0.1 * adapt).tolist()} for r in prefs]
            records.append({"method": "dymu", "adaptation": adapt, "c": c, "hypervolume": 1.5 - c + 0.1 * adapt,
                            "hypervolume_method": "exact", "uniformity": 0.8, "mean_params": 60.0,
                            "mean_gflops": 0.6, "preferences": recs})
    return {"tasks": tasks, "anchor": {"params": 100, "gflops": 1.0, "losses": anchor_losses},
            "records": records}


def test_marginal_series_sorts_each_task_against_its_own_preference():
    result = hand_result()
    panels = marginal_series(result)
    assert [p["task"] for p in panels] == result["tasks"]
    for t, panel in enumerate(panels):
        assert panel["anchor"] == pytest.approx(0.5 + 0.1 * t)
        assert [(s["c"], s["adaptation"]) for s in panel["series"]] == [(0.0, False), (0.0, True), (1.0, False),
                                                                      (1.0, True)]
        for s in panel["series"]:
            rec = next(r for r in result["records"] if r["method"] == "dymu" and r["c"] == s["c"]
                       and r["adaptation"] == s["adaptation"])
            assert s["r"] == sorted(p["r"][t] for p in rec["preferences"])
            expected = {p["r"][t]: p["losses"][t] for p in rec["preferences"]}
            assert s["loss"] == [expected[x] for x in s["r"]]


@pytest.mark.parametrize("n_tasks", [3, 23])
def test_marginal_plot_is_written(n_tasks, tmp_path):
    path = plot_marginal_controllability(hand_result(n_tasks), tmp_path / "marginal.png")
    assert path == tmp_path / "marginal.png"
    assert_png(path)


def test_write_plots_names_both_files(model3, tmp_path):
    plots = write_plots(model3, hand_result(), tmp_path)
    assert plots == {k: v for k, v in PLOT_FILES.items() if k != "cost_accuracy"}  # no budgets evaluated
    assert "trees" in plots
    for file in plots.values():
        assert_png(tmp_path / file)


def test_cost_accuracy_points_and_plot(tmp_path):
    def record(method, adaptation, mean_params, ratio, **budget):
        return {**budget, "method": method, "adaptation": adaptation, "c": 0.0, "hypervolume": 1.0,
                "hypervolume_method": "exact", "hypervolume_ratio": ratio, "uniformity": 0.9,
                "mean_params": mean_params, "mean_gflops": 0.1, "preferences": []}

    result = {"anchor": {"params": 200},
              "records": [record("dymu", False, 180, 0.97), record("single-task anchor", False, 200, 1.0)],
              "budget_records": [record("dymu", True, 110, 0.9, budget=0.6, budget_metric="params")]}
    phn_bn = CompareRow(CompareKind.PHN_BN, hypervolume=2.4, hv_ratio=1.2, uniformity=0.8, params=100, gflops=0.1,
                        control_params=10, train_seconds=None, stored_params=300)
    points = cost_accuracy_points(result, [phn_bn])
    assert [(p["label"], p["params"], p["hv"]) for p in points] == [
        ("single-task anchor", 1.0, 1.0), ("dymu c=0", 0.9, 0.97), ("B=0.6", 0.55, 0.9), ("PHN-BN", 0.5, 1.2)]
    assert_png(plot_cost_accuracy(points, tmp_path / "cost.png"))


def test_hypervolume_ratio_is_relative_to_the_anchor_at_the_same_c():
    records = with_hypervolume_ratios(hand_result(anchor_hv=2.0)["records"])
    for rec in records:
        expected = 1.0 if rec["method"] == "single-task anchor" else (1.5 - rec["c"] + 0.1 * rec["adaptation"]) / 2.0
        assert rec["hypervolume_ratio"] == pytest.approx(expected)
        keys = list(rec)
        assert keys.index("hypervolume_ratio") == keys.index("hypervolume_method") + 1
    zero = with_hypervolume_ratios(hand_result(anchor_hv=0.0)["records"])
    assert all(rec["hypervolume_ratio"] is None for rec in zero)
    lone = with_hypervolume_ratios([r for r in hand_result()["records"] if r["method"] == "dymu"])
    assert all(rec["hypervolume_ratio"] is None for rec in lone)


def test_report_has_the_ratio_column_and_the_figures():
    result = hand_result()
    result.update({"num_test_samples": 8, "reference_point": [1.0, 1.0, 1.0], "reference_point_source": "test",
                   "control_params": 10, "inference_cost": {"all": {"count": 5, "mean_params": 60.0,
                                                                   "mean_gflops": 0.6}},
                   "controllability": [{"preference": "uniform", "params": {"0.0": 60}, "architecture": {"0.0": "x"}}],
                   "records": with_hypervolume_ratios(result["records"]), "plots": dict(PLOT_FILES)})
    report = render_report(result)
    assert "| HV / anchor's |" in report and "(5 preferences" in report
    assert "| dymu | no | 1 | 0.5 (exact) | 0.250 |" in report
    for file in PLOT_FILES.values():
        assert f"({file})" in report
    del result["plots"]
    assert "## Figures" not in render_report(result)
