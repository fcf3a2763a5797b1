"""Tests of dymu.metrics: hypervolume, uniformity and Delta_m against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymoo.indicators.hv import HV

from dymu.metrics import delta_m, hypervolume, hypervolume_method, mean_uniformity, uniformity


@pytest.mark.parametrize("method", ["exact", "auto"])
def test_hypervolume_2d_hand_values(method: str) -> None:
    ref = [3.0, 3.0]
    # One point: the box [1, 3] x [1, 3].
    assert hypervolume([[1.0, 1.0]], ref, method) == pytest.approx(4.0)
    # Two boxes of area 2 each ([1,3]x[2,3] and [2,3]x[1,3]) overlapping in [2,3]x[2,3] of area 1.
    assert hypervolume([[1.0, 2.0], [2.0, 1.0]], ref, method) == pytest.approx(3.0)
    # [2.5, 2.5] is dominated by [1, 2] and [2, 1]: no change.
    assert hypervolume([[1.0, 2.0], [2.0, 1.0], [2.5, 2.5]], ref, method) == pytest.approx(3.0)
    # Points outside the reference box (or on its boundary) contribute nothing.
    assert hypervolume([[1.0, 1.0], [0.0, 4.0], [3.0, 0.0]], ref, method) == pytest.approx(4.0)
    assert hypervolume([[4.0, 4.0]], ref, method) == 0.0
    assert hypervolume(np.zeros((0, 2)), ref, method) == 0.0


def test_hypervolume_3d_hand_value() -> None:
    ref = [2.0, 2.0, 2.0]
    assert hypervolume([[1.0, 1.0, 1.0]], ref) == pytest.approx(1.0)
    # Boxes A=[0,1,1], B=[1,0,1], C=[1,1,0] have volume 2 each; every pairwise and the triple
    # intersection is the unit cube [1,2]^3: 3 * 2 - 3 * 1 + 1 = 4.
    pts = [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    assert hypervolume(pts, ref) == pytest.approx(4.0)
    assert hypervolume(torch.tensor(pts), torch.tensor(ref)) == pytest.approx(4.0)


def test_hypervolume_matches_pymoo_on_random_4d() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(0.0, 1.0, size=(30, 4))
    ref = np.full(4, 1.1)
    expected = HV(ref_point=ref)(pts)
    assert hypervolume(pts, ref, "exact") == pytest.approx(expected, rel=1e-12)
    assert hypervolume(pts, ref) == pytest.approx(expected, rel=1e-12)
    # Points outside the reference box do not change the value.
    outside = np.vstack([pts, [[1.5, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 1.1]]])
    assert hypervolume(outside, ref) == pytest.approx(expected, rel=1e-12)


def test_hypervolume_approx_close_to_exact_6d() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(0.2, 1.0, size=(15, 6))
    ref = np.full(6, 1.2)
    exact = hypervolume(pts, ref, "exact")
    approx = hypervolume(pts, ref, "approx")
    assert exact > 0
    assert abs(approx - exact) / exact < 0.02  # measured: 3e-4
    # A point outside the box would give a negative term to the approximation's formula: it is dropped.
    assert hypervolume(np.vstack([pts, [[2.0] * 6]]), ref, "approx") == approx
    assert hypervolume([[2.0] * 6], ref, "approx") == 0.0


def test_hypervolume_method_choice() -> None:
    assert hypervolume_method(20, 20) == "exact"
    assert hypervolume_method(21, 10) == "approx"
    assert hypervolume_method(21, 9) == "exact"
    assert hypervolume_method(1000, 3) == "exact"
    assert hypervolume_method(5, 3, "approx") == "approx"
    assert hypervolume_method(500, 20, "exact") == "exact"
    with pytest.raises(ValueError, match="must be one of"):
        hypervolume_method(5, 3, "fast")
    with pytest.raises(ValueError, match="must be one of"):
        hypervolume([[1.0, 1.0]], [2.0, 2.0], "fast")


@pytest.mark.parametrize(
    ("points", "ref", "match"),
    [
        ([1.0, 1.0], [2.0, 2.0], r"points must have shape \(P, M\)"),
        ([[1.0, 1.0]], [2.0, 2.0, 2.0], r"ref_point must have shape \(2,\)"),
        ([[float("nan"), 1.0]], [2.0, 2.0], "points must be finite"),
        ([[1.0, 1.0]], [float("inf"), 2.0], "ref_point must be finite"),
    ],
)
def test_hypervolume_rejects_bad_input(points: object, ref: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hypervolume(points, ref)


def test_uniformity_hand_values() -> None:
    # Equal weighted losses r_j L_j: Lhat is uniform, KL = 0.
    assert uniformity([0.5, 0.5], [2.0, 2.0]) == pytest.approx(1.0)
    assert uniformity([0.2, 0.8], [4.0, 1.0]) == pytest.approx(1.0)
    # r = [0.5, 0.5], L = [1, 3]: r L = [0.5, 1.5], Lhat = [0.25, 0.75],
    # KL = 0.25 ln(0.25 / 0.5) + 0.75 ln(0.75 / 0.5) = -0.1732868 + 0.3040988 = 0.1308120.
    assert uniformity([0.5, 0.5], [1.0, 3.0]) == pytest.approx(1 - 0.1308120, abs=1e-7)
    # All mass on one task: KL = 1 * ln(1 / (1/N)) = ln N (and 0 ln 0 = 0 for the others).
    assert uniformity([1.0, 0.0, 0.0], [1.0, 5.0, 7.0]) == pytest.approx(1 - math.log(3))
    assert uniformity(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 2.0])) == pytest.approx(1 - math.log(2))


def test_mean_uniformity() -> None:
    rs = [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]
    losses = [[2.0, 2.0], [1.0, 3.0], [1.0, 1.0]]
    expected = (1.0 + (1 - 0.1308120) + (1 - math.log(2))) / 3
    assert mean_uniformity(rs, losses) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    ("r", "losses", "match"),
    [
        ([0.5, 0.5], [1.0], "same shape"),
        ([[0.5, 0.5]], [[1.0, 1.0]], r"r must have shape \(N,\)"),
        ([1.5, -0.5], [1.0, 1.0], "r must be non-negative"),
        ([0.5, 0.5], [1.0, -1.0], "losses must be non-negative"),
        ([1.0, 0.0], [0.0, 5.0], "sum_i r_i L_i > 0"),
        ([0.5, 0.5], [float("nan"), 1.0], "losses must be finite"),
    ],
)
def test_uniformity_rejects_bad_input(r: object, losses: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uniformity(r, losses)


def test_mean_uniformity_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"rs must have shape \(P, N\)"):
        mean_uniformity([0.5, 0.5], [1.0, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        mean_uniformity([[0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0]])


def test_delta_m_hand_values() -> None:
    # Accuracy 0.80 vs 0.75 (higher better): +0.05 / 0.75 = +0.0666667.
    # Error 10 vs 12 (lower better): -(10 - 12) / 12 = +0.1666667. Mean: 0.1166667.
    assert delta_m([0.80, 10.0], [0.75, 12.0], [False, True]) == pytest.approx(0.1166667, abs=1e-7)
    # RMSE 0.66 vs 0.6 (lower better): -0.1; mIoU 40 vs 50 (higher better): -0.2;
    # angle 20 vs 25 (lower better): +0.2. Mean: -0.1 / 3.
    assert delta_m([0.66, 40.0, 20.0], [0.6, 50.0, 25.0], [True, False, True]) == pytest.approx(-0.1 / 3)
    assert delta_m([1.0, 2.0], [1.0, 2.0], [True, False]) == 0.0


@pytest.mark.parametrize(
    ("metrics", "single", "lower", "match"),
    [
        ([1.0, 2.0], [1.0], [True, False], "same length"),
        ([1.0, 2.0], [1.0, 2.0], [True], "same length"),
        ([], [], [], "N >= 1"),
        ([1.0], [0.0], [True], "non-zero"),
        ([float("nan")], [1.0], [True], "metrics must be finite"),
    ],
)
def test_delta_m_rejects_bad_input(metrics: list, single: list, lower: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        delta_m(metrics, single, lower)
