"""Tests of dymu.affinity: RSA affinity on constructed features, and its JSON / heatmap files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dymu.affinity import load_affinity, rsa_affinity, save_affinity


def _random_features(n_layers: int, k: int = 6, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(k, 3, 4, 4, generator=gen) for _ in range(n_layers)]


def test_identical_streams_give_all_ones() -> None:
    stream = _random_features(2)
    aff = rsa_affinity([stream, [f.clone() for f in stream], [f.clone() for f in stream]])
    assert aff.shape == (3, 3) and aff.dtype == torch.float32
    torch.testing.assert_close(aff, torch.ones(3, 3))


def test_shared_and_random_streams() -> None:
    shared = _random_features(2, seed=0)
    other = _random_features(2, seed=1)
    aff = rsa_affinity([shared, shared, other])
    # Row 0: D(0,0) = D(0,1) = 0 is the row minimum (scaled 0, affinity 1), D(0,2) the maximum
    # (scaled 1, affinity 0); row 1 likewise; row 2 has D(2,0) = D(2,1) maximal.
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(aff, expected)


def test_hand_computed_three_streams_one_layer() -> None:
    # K = 2 images, so S(t) = [[1, s_t], [s_t, 1]] with s_t the cosine of the two images' features, and
    # D(i, j) = sqrt(2) |s_i - s_j|. s = 1, 0, 0.5 for the three streams:
    # D / sqrt(2) = [[0, 1, .5], [1, 0, .5], [.5, .5, 0]]; rows scaled by 1, 1, .5:
    # [[0, 1, .5], [1, 0, .5], [1, 1, 0]]; Aff = 1 - that (not symmetric).
    s3 = math.sqrt(3) / 2
    features = [
        [torch.tensor([[1.0, 0.0], [2.0, 0.0]])],
        [torch.tensor([[1.0, 0.0], [0.0, 3.0]])],
        [torch.tensor([[1.0, 0.0], [0.5, s3]])],
    ]
    expected = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(rsa_affinity(features), expected)


def test_hand_computed_two_streams_two_layers() -> None:
    # Layer 1: the streams' similarity matrices are equal, D = 0, rows constant -> Aff_1 = all ones.
    # Layer 2: they differ, each row is [0, d] -> scaled [0, 1] (row 1: [1, 0]) -> Aff_2 = identity.
    # Mean: [[1, .5], [.5, 1]].
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    features = [
        [a, torch.tensor([[1.0, 0.0], [1.0, 0.0]])],
        [3.0 * a, torch.tensor([[1.0, 0.0], [0.0, 1.0]])],
    ]
    torch.testing.assert_close(rsa_affinity(features), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))


def test_streams_equal_up_to_rounding_count_as_equal() -> None:
    # 7.3 * x rounds in float32, so the cosines differ from x's by ~1e-8: without the rounding
    # tolerance, the row's range of ~1e-8 would be stretched to [0, 1] and give Aff = identity.
    x = _random_features(1, k=100)
    aff = rsa_affinity([x, [7.3 * f for f in x]])
    torch.testing.assert_close(aff, torch.ones(2, 2))


def test_single_task() -> None:
    torch.testing.assert_close(rsa_affinity([_random_features(3)]), torch.ones(1, 1))


def test_invariant_to_positive_rescaling() -> None:
    streams = [_random_features(3, seed=s) for s in range(4)]
    aff = rsa_affinity(streams)
    scaled = [list(s) for s in streams]
    scaled[2] = [7.5 * f for f in streams[2]]
    # Per-image positive scales are also invisible to the cosine.
    per_image = torch.tensor([0.1, 2.0, 3.0, 0.5, 9.0, 1.0]).view(6, 1, 1, 1)
    scaled[0] = [per_image * f for f in streams[0]]
    torch.testing.assert_close(rsa_affinity(scaled), aff)
    assert not torch.allclose(aff, aff.T)  # row scaling: not symmetric in general
    assert torch.all(aff.diagonal() == 1) and aff.min() >= 0 and aff.max() <= 1


def test_feature_shapes_may_differ_between_streams() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, generator=gen)
    wide = torch.cat([base, torch.zeros(5, 6)], dim=1)  # same cosines, more channels
    aff = rsa_affinity([[base], [wide], [torch.randn(5, 3, 2, generator=gen)]])
    assert aff[0, 1] == 1.0 and aff[1, 0] == 1.0


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ([], "at least one task"),
        ([[]], "L >= 1"),
        ([[torch.zeros(3, 2)], [torch.zeros(3, 2), torch.zeros(3, 2)]], r"got \[1, 2\] layers"),
        ([[torch.ones(3, 2)], [torch.ones(4, 2)]], r"K = \[3, 4\]"),
        ([[torch.ones(1, 2)], [torch.ones(1, 2)]], "K >= 2"),
    ],
)
def test_rejects_bad_features(features: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rsa_affinity(features)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    aff = torch.tensor([[1.0, 0.25, 0.0], [0.5, 1.0, 0.125], [0.0, 0.75, 1.0]])
    names = ["semseg", "normals", "depth"]
    json_path = tmp_path / "sub" / "affinity.json"
    png_path = tmp_path / "plots" / "affinity.png"
    save_affinity(aff, names, json_path, png_path)
    data = json.loads(json_path.read_text())
    assert data == {"tasks": names, "affinity": aff.tolist()}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 1000
    torch.testing.assert_close(load_affinity(json_path, names), aff)
    torch.testing.assert_close(load_affinity(str(json_path)), aff)


def test_save_without_png(tmp_path: Path) -> None:
    save_affinity(torch.eye(2), ["a", "b"], tmp_path / "aff.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aff.json"]


def test_load_rejects_mismatched_names(tmp_path: Path) -> None:
    json_path = tmp_path / "affinity.json"
    save_affinity(torch.eye(2), ["semseg", "depth"], json_path)
    with pytest.raises(
        ValueError,
        match=r"affinity\.json is for tasks \['semseg', 'depth'\] but the run has "
        r"tasks \['depth', 'semseg'\]",
    ):
        load_affinity(json_path, ["depth", "semseg"])


def test_shape_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        save_affinity(torch.eye(2), ["a", "b", "c"], tmp_path / "a.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": ["a", "b"], "affinity": [[1.0, 0.0, 0.0]]}))
    with pytest.raises(ValueError, match=r"bad\.json: affinity must have shape \(2, 2\)"):
        load_affinity(bad)
    bad.write_text(json.dumps({"affinity": [[1.0]]}))
    with pytest.raises(ValueError, match="not an affinity file"):
        load_affinity(bad)
