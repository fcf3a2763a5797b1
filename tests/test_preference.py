"""Tests of dymu.preference: validation, samplers and the preference embedding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dymu.preference import (
    Preference,
    PreferenceEmbedding,
    cost_preferences,
    evaluation_preferences,
    sample_training_preference,
)


def test_valid_preference_is_stored_as_floats() -> None:
    pref = Preference([0.25, 0.75], 0.5)
    assert pref.r == (0.25, 0.75)
    assert all(type(x) is float for x in pref.r)
    assert pref.c == 0.5 and type(pref.c) is float
    assert pref.n_tasks == 2


@pytest.mark.parametrize(
    "r",
    [np.array([0.2, 0.3, 0.5]), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), (0.2, 0.3, 0.5)],
)
def test_accepts_numpy_torch_and_tuples(r: object) -> None:
    pref = Preference(r, torch.tensor(0.3))
    assert pref.r == pytest.approx((0.2, 0.3, 0.5))
    assert pref.c == pytest.approx(0.3)


def test_float32_tensor_within_tolerance_is_accepted() -> None:
    r = torch.tensor([0.1, 0.2, 0.7])  # float32: the sum is 1 only up to rounding
    assert Preference(r, 0.0).r == pytest.approx((0.1, 0.2, 0.7), abs=1e-7)


@pytest.mark.parametrize(
    ("r", "c", "match"),
    [
        ([0.5, 0.8], 0.0, r"must sum to 1 \(got 1\.3"),
        ([0.5, 0.8], 0.0, "normalize=True"),
        ([1.2, -0.2], 0.0, r"non-negative \(got r\[1\] = -0\.2"),
        ([float("nan"), 1.0], 0.0, "must be finite.*nan"),
        ([float("inf"), 0.0], 0.0, "must be finite.*inf"),
        ([], 0.0, "must not be empty"),
        ([[0.5, 0.5], [0.5, 0.5]], 0.0, r"must be 1-D \(got shape \(2, 2\)\)"),
        ([0.5, 0.5], -0.1, r"c must lie in \[0, 1\] \(got -0\.1\)"),
        ([0.5, 0.5], 1.5, r"c must lie in \[0, 1\] \(got 1\.5\)"),
        ([0.5, 0.5], float("nan"), r"c must be finite \(got nan\)"),
        ([0.5, 0.5], float("inf"), r"c must be finite \(got inf\)"),
        ([0.5, 0.5], [0.1, 0.2], r"c must be a scalar \(got shape \(2,\)\)"),
        (["a", "b"], 0.0, "must be real numbers"),
    ],
)
def test_invalid_preferences_are_rejected(r: object, c: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Preference(r, c)


def test_wrong_number_of_tasks_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"preference has 2 entries but the model has 3 tasks \("):
        Preference.create([0.5, 0.5], 0.0, n_tasks=3)
    assert Preference.create([0.5, 0.5], 0.0, n_tasks=2).n_tasks == 2
    with pytest.raises(ValueError, match="has 3 entries but the model has 2 tasks"):
        Preference.uniform(3).check_n_tasks(2)


def test_normalize_rescales() -> None:
    pref = Preference.create([1.0, 3.0], 0.2, normalize=True)
    assert pref.r == pytest.approx((0.25, 0.75))
    assert sum(pref.r) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    ("r", "match"),
    [([0.0, 0.0], "positive sum"), ([1.0, -1.0, 2.0], "non-negative"), ([float("nan"), 1.0], "finite")],
)
def test_normalize_still_validates(r: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Preference.create(r, 0.0, normalize=True)


def test_uniform_tensors_and_dict_roundtrip() -> None:
    pref = Preference.uniform(4, c=0.7)
    assert pref.r == pytest.approx((0.25,) * 4)
    r = pref.r_tensor(dtype=torch.float64)
    assert r.shape == (4,) and r.dtype == torch.float64
    c = pref.c_tensor()
    assert c.shape == () and c.dtype == torch.float32 and c.item() == pytest.approx(0.7)
    assert Preference.from_dict(pref.to_dict()) == pref
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        Preference.from_dict({"r": [1.0]})
    with pytest.raises(ValueError, match="n >= 1"):
        Preference.uniform(0)


def test_preference_is_frozen_and_hashable() -> None:
    pref = Preference([1.0], 0.0)
    with pytest.raises(AttributeError):
        pref.c = 0.5  # type: ignore[misc]
    assert len({pref, Preference((1.0,), 0.0)}) == 1


def test_training_sampler_is_deterministic_and_valid() -> None:
    a = [sample_training_preference(3, np.random.default_rng(7)) for _ in range(3)]
    b = [sample_training_preference(3, np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(7)
    draws = [sample_training_preference(3, rng) for _ in range(5)]
    assert len(set(draws)) == 5


def test_training_sampler_distribution() -> None:
    rng = np.random.default_rng(0)
    prefs = [sample_training_preference(4, rng) for _ in range(5000)]
    rs = np.array([p.r for p in prefs])
    cs = np.array([p.c for p in prefs])
    assert np.all(rs >= 0) and np.allclose(rs.sum(axis=1), 1.0, atol=1e-9)
    assert np.allclose(rs.mean(axis=0), 0.25, atol=0.02)
    # eta = 0.2 is sparse: about 46% of the entries are below 0.05 and 45% of the draws put more than 0.8
    # on one task; Dirichlet(1) gives 14% and 3%.
    assert (rs < 0.05).mean() > 0.35
    assert (rs.max(axis=1) > 0.8).mean() > 0.35
    assert cs.min() >= 0.0 and cs.max() <= 1.0
    assert cs.min() < 0.01 and cs.max() > 0.99 and abs(cs.mean() - 0.5) < 0.02
    uniform_draws = rng.dirichlet(np.ones(4), size=5000)
    assert (uniform_draws < 0.05).mean() < 0.2


def test_training_sampler_survives_tiny_eta() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        pref = sample_training_preference(5, rng, eta=0.01)
        assert abs(sum(pref.r) - 1.0) < 1e-9
    with pytest.raises(ValueError, match="eta must be > 0"):
        sample_training_preference(3, rng, eta=0.0)
    with pytest.raises(ValueError, match="n_tasks must be >= 1"):
        sample_training_preference(0, rng)


def test_evaluation_preferences() -> None:
    prefs0 = evaluation_preferences(3, count=20, c=0.0, seed=0)
    prefs1 = evaluation_preferences(3, count=20, c=1.0, seed=0)
    assert len(prefs0) == 20 and len(prefs1) == 20
    assert prefs0 == evaluation_preferences(3, count=20, c=0.0, seed=0)
    assert prefs0 != evaluation_preferences(3, count=20, c=0.0, seed=1)
    assert [p.r for p in prefs0] == [p.r for p in prefs1]
    assert all(p.c == 0.0 for p in prefs0) and all(p.c == 1.0 for p in prefs1)
    rs = np.array([p.r for p in prefs0])
    assert np.all(rs >= 0) and np.allclose(rs.sum(axis=1), 1.0)
    assert len({p.r for p in prefs0}) == 20
    with pytest.raises(ValueError, match="lie in"):
        evaluation_preferences(3, c=2.0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        evaluation_preferences(3, count=0)


def test_evaluation_alpha_concentrates() -> None:
    rs = np.array([p.r for p in evaluation_preferences(3, count=200, alpha=100.0)])
    assert np.abs(rs - 1 / 3).max() < 0.15


def test_cost_preferences() -> None:
    prefs = cost_preferences(4, count=1000, seed=3)
    assert len(prefs) == 1000
    assert prefs == cost_preferences(4, count=1000, seed=3)
    cs = np.array([p.c for p in prefs])
    rs = np.array([p.r for p in prefs])
    assert cs.min() >= 0 and cs.max() <= 1 and cs.min() < 0.01 and cs.max() > 0.99
    assert np.allclose(rs.mean(axis=0), 0.25, atol=0.02)
    assert np.allclose(rs.sum(axis=1), 1.0)


def test_embedding_equals_hand_sum() -> None:
    torch.manual_seed(0)
    emb = PreferenceEmbedding(3, dim=8)
    assert emb.task_embeddings.shape == (3, 8) and emb.cost_embedding.shape == (8,)
    pref = Preference([0.2, 0.5, 0.3], 0.6)
    out = emb(pref.r_tensor(), pref.c_tensor())
    e, ec = emb.task_embeddings.detach(), emb.cost_embedding.detach()
    expected = 0.2 * e[0] + 0.5 * e[1] + 0.3 * e[2] + 0.6 * ec
    assert out.shape == (8,)
    torch.testing.assert_close(out.detach(), expected)
    batch = emb(torch.stack([pref.r_tensor(), torch.tensor([1.0, 0.0, 0.0])]), torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(batch.detach()[0], expected)
    torch.testing.assert_close(batch.detach()[1], e[0])


def test_embedding_gradients_and_init_scale() -> None:
    torch.manual_seed(0)
    emb = PreferenceEmbedding(2, dim=256)
    assert math.isclose(float(emb.task_embeddings.detach().std()), 1 / 16, rel_tol=0.1)
    emb(torch.tensor([1.0, 0.0]), torch.tensor(1.0)).sum().backward()
    assert emb.task_embeddings.grad is not None and emb.cost_embedding.grad is not None
    assert torch.all(emb.task_embeddings.grad[1] == 0) and torch.all(emb.task_embeddings.grad[0] == 1)


def test_embedding_rejects_bad_shapes() -> None:
    emb = PreferenceEmbedding(3)
    with pytest.raises(ValueError, match=r"r must have shape \(3,\)"):
        emb(torch.tensor([0.5, 0.5]), torch.tensor(0.0))
    with pytest.raises(ValueError, match="c must have shape"):
        emb(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.0]))


@pytest.mark.parametrize("r, c", [([0.5, 0.5], "0.5"), ([0.5, 0.5], True), (["0.5", "0.5"], 0.5),
                                  ([True, False], 0.5), (torch.tensor([True, False]), 0.5)])
def test_strings_and_booleans_are_refused(r, c):
    with pytest.raises(ValueError, match="must be (a |real )?numbers?"):
        Preference.create(r, c)
