"""Tests of the synthetic data modules: determinism, formats, geometric consistency, task relatedness."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules import SyntheticRegressionDataModule, SyntheticScenesDataModule
from datamodules.datasets.synthetic import ACTIVATIONS, DENSE_TASKS
from datamodules.synthetic import DEFAULT_SCALES

SIZE = 32


def make_scenes(**kwargs: object) -> SyntheticScenesDataModule:
    config = {
        "tasks": list(DENSE_TASKS),
        "num_train": 24,
        "num_val": 8,
        "num_test": 8,
        "image_size": SIZE,
        "batch_size": 8,
    }
    config.update(kwargs)
    return SyntheticScenesDataModule(**config)


@pytest.fixture(scope="module")
def scenes() -> dict[str, Tensor]:
    return make_scenes().dataset("train").tensors


@pytest.fixture(scope="module")
def camera_rays() -> Tensor:
    """Ray directions in camera coordinates (x right, y up, z forward), ``(3, S, S)``."""
    coords = (torch.arange(SIZE) + 0.5) / SIZE * 2 - 1
    tan = math.tan(math.radians(30))
    v, u = torch.meshgrid(-coords * tan, coords * tan, indexing="ij")
    return torch.stack((u, v, torch.ones_like(u)))


def neighbour_pairs(x: Tensor) -> list[tuple[Tensor, Tensor, tuple[slice, ...]]]:
    """(first, second, index of first) for right and down neighbours of ``(..., H, W)`` maps."""
    right = (..., slice(None), slice(None, -1))
    down = (..., slice(None, -1), slice(None))
    return [
        (x[right], x[..., :, 1:], right),
        (x[down], x[..., 1:, :], down),
    ]


# ---------------------------------------------------------------------------------------------------------
# Dense scenes
# ---------------------------------------------------------------------------------------------------------


def test_scenes_same_seed_same_data_other_seed_other_data(scenes: dict[str, Tensor]) -> None:
    again = make_scenes().dataset("train").tensors
    assert all(torch.equal(scenes[key], again[key]) for key in scenes)
    other = make_scenes(seed=1).dataset("train").tensors
    assert not torch.equal(scenes["image"], other["image"])
    assert not torch.equal(scenes["depth"], other["depth"])


def test_scene_splits_differ() -> None:
    dm = make_scenes()
    images = {split: dm.dataset(split).tensors["image"] for split in ("train", "val", "test")}
    assert not torch.equal(images["train"][:8], images["val"])
    assert not torch.equal(images["val"], images["test"])


def test_scene_shapes_dtypes_and_ranges(scenes: dict[str, Tensor]) -> None:
    n = 24
    assert set(scenes) == {"image", *DENSE_TASKS}
    image, semseg, depth = scenes["image"], scenes["semseg"], scenes["depth"]
    normals, edges = scenes["normals"], scenes["edges"]
    assert image.shape == (n, 3, SIZE, SIZE) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.1
    assert semseg.shape == (n, SIZE, SIZE) and semseg.dtype == torch.int64
    assert set(semseg.unique().tolist()) == {0, 1, 2, 3}
    assert depth.shape == (n, 1, SIZE, SIZE) and depth.dtype == torch.float32
    assert torch.isfinite(depth).all() and depth.min() > 1.0 and depth.max() < 15.0
    assert normals.shape == (n, 3, SIZE, SIZE) and normals.dtype == torch.float32
    assert torch.allclose(torch.linalg.vector_norm(normals, dim=1), torch.ones(n, SIZE, SIZE), atol=1e-5)
    assert edges.shape == (n, 1, SIZE, SIZE) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert 0.01 < edges.mean() < 0.2


def test_only_configured_tasks_in_configured_order() -> None:
    dm = make_scenes(tasks=["edges", "depth"])
    assert set(dm.dataset("val")[0]) == {"image", "edges", "depth"}
    assert dm.task_names == ["edges", "depth"]
    assert [(t.kind, t.name, t.out_channels) for t in dm.tasks] == [
        ("edges", "edges", 1),
        ("depth", "depth", 1),
    ]
    assert dm.input_shape == (3, SIZE, SIZE)


def test_default_and_custom_scales() -> None:
    dm = make_scenes()
    assert {t.name: t.scale for t in dm.tasks} == DEFAULT_SCALES
    assert dm.tasks[0].out_channels == 4
    custom = make_scenes(scales={"normals": 10.0})
    assert {t.name: t.scale for t in custom.tasks} == {**DEFAULT_SCALES, "normals": 10.0}


def test_visible_normals_face_the_camera(scenes: dict[str, Tensor], camera_rays: Tensor) -> None:
    facing = (scenes["normals"] * camera_rays).sum(dim=1)
    assert (facing < 0).all()


def test_ground_normals_point_up_and_sphere_normals_vary(scenes: dict[str, Tensor]) -> None:
    normals = scenes["normals"].permute(0, 2, 3, 1)
    ground = normals[scenes["semseg"] == 1]
    # Camera pitch is 5..20 degrees down, so the ground's normal is (0, cos pitch, -sin pitch).
    assert ground[:, 0].abs().max() < 1e-5
    assert ground[:, 1].min() > math.cos(math.radians(20.5))
    assert ground[:, 2].max() < -math.sin(math.radians(4.5))
    sphere = normals[scenes["semseg"] == 2]
    assert sphere.std(dim=0).min() > 0.2


def test_depth_jumps_and_class_boundaries_are_edges(scenes: dict[str, Tensor], camera_rays: Tensor) -> None:
    edges = scenes["edges"][:, 0].bool()
    depth = scenes["depth"][:, 0]
    # A surface seen at a grazing angle (the ground near the horizon, a box's top near eye level) changes
    # depth by 30 % or more between pixels without any discontinuity: skip pairs whose far pixel is grazing.
    facing = (scenes["normals"] * F.normalize(camera_rays, dim=0)).sum(dim=1).abs()
    for (first, second, index), (label, other_label, _), (facing_first, facing_second, _) in zip(
        neighbour_pairs(depth), neighbour_pairs(scenes["semseg"]), neighbour_pairs(facing)
    ):
        facing_far = torch.where(first > second, facing_first, facing_second)
        jump = ((first - second).abs() / torch.minimum(first, second) > 0.3) & (facing_far > 0.3)
        assert jump.sum() > 100
        assert edges[index][jump].all()
        assert edges[index][label != other_label].all()


def test_edges_lie_where_labels_depth_or_normals_change(scenes: dict[str, Tensor]) -> None:
    changed = torch.zeros_like(scenes["edges"][:, 0], dtype=torch.bool)
    pairs = zip(
        neighbour_pairs(scenes["semseg"]),
        neighbour_pairs(scenes["depth"][:, 0]),
        neighbour_pairs(scenes["normals"]),
    )
    for (label, label2, index), (depth, depth2, _), (normal, normal2, _) in pairs:
        cos = (normal * normal2).sum(dim=1)
        # Two parallel box faces can occlude each other with a depth step of only ~3 %.
        changed[index] |= (label != label2) | ((depth - depth2).abs() / depth > 0.01) | (cos < math.cos(0.3))
    assert changed[scenes["edges"][:, 0].bool()].all()


def image_gradient(image: Tensor) -> Tensor:
    grad = torch.zeros(image.shape[0], image.shape[2], image.shape[3])
    grad[:, :, :-1] += (image[..., :, 1:] - image[..., :, :-1]).abs().sum(1)
    grad[:, :-1, :] += (image[..., 1:, :] - image[..., :-1, :]).abs().sum(1)
    return grad


def test_image_and_labels_come_from_one_geometry(scenes: dict[str, Tensor]) -> None:
    grad = image_gradient(scenes["image"])
    edges = scenes["edges"][:, 0].bool()
    ratio = grad[edges].mean() / grad[~edges].mean()
    shuffled = edges.roll(1, dims=0)
    ratio_other_scene = grad[shuffled].mean() / grad[~shuffled].mean()
    assert ratio > 2.0
    assert ratio > 1.5 * ratio_other_scene


def test_fewer_classes_merge_surface_kinds(scenes: dict[str, Tensor]) -> None:
    two = make_scenes(num_classes=2)
    assert two.tasks[0].out_channels == 2
    assert torch.equal(two.dataset("train").tensors["semseg"], (scenes["semseg"] >= 2).long())
    three = make_scenes(num_classes=3).dataset("train").tensors["semseg"]
    assert torch.equal(three, scenes["semseg"].clamp(max=2))


def test_scene_dataloaders() -> None:
    dm = make_scenes(tasks=["semseg", "normals"])
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 24 // 8
    batch = train[0]
    assert set(batch) == {"image", "semseg", "normals"}
    assert batch["image"].shape == (8, 3, SIZE, SIZE) and batch["semseg"].shape == (8, SIZE, SIZE)
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["image"], dm.dataset("val").tensors["image"][:8])
    test = next(iter(dm.test_dataloader()))
    assert torch.equal(test["normals"], dm.dataset("test").tensors["normals"][:8])


def test_sample_inputs_are_seeded_training_inputs(scenes: dict[str, Tensor]) -> None:
    dm = make_scenes()
    picked = dm.sample_inputs(5, seed=3)
    assert picked.shape == (5, 3, SIZE, SIZE)
    assert torch.equal(picked, dm.sample_inputs(5, seed=3))
    assert not torch.equal(picked, dm.sample_inputs(5, seed=4))
    flat = scenes["image"].flatten(1)
    assert all((flat == row).all(dim=1).sum() == 1 for row in picked.flatten(1))


def test_zero_prediction_gives_a_finite_loss_for_every_dense_task(scenes: dict[str, Tensor]) -> None:
    for task in make_scenes().tasks:
        target = scenes[task.name][:4]
        loss = task.loss(torch.zeros(4, task.out_channels, SIZE, SIZE), target)
        assert torch.isfinite(loss) and loss > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["semseg", "saliency"]}, r"saliency.*semseg.*depth.*normals.*edges"),
        ({"tasks": ["depth", "depth"]}, r"distinct.*semseg"),
        ({"tasks": ["depth"]}, r"2 to 4"),
        ({"num_classes": 5}, r"num_classes 5.*\[2, 3, 4\]"),
        ({"num_classes": 1}, r"num_classes 1"),
        ({"image_size": 0}, r"image_size must be at least 1, got 0"),
        ({"num_val": 0}, r"num_val must be at least 1, got 0"),
        ({"batch_size": 32}, r"num_train \(24\).*batch_size \(32\)"),
        ({"num_workers": -1}, r"num_workers"),
        ({"scales": {"segmentation": 1.0}}, r"segmentation.*configured"),
        ({"scales": {"depth": -1.0}}, r"scale"),
    ],
)
def test_scenes_reject_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_scenes(**kwargs)


def test_bad_sample_count_and_split_raise() -> None:
    dm = make_scenes()
    with pytest.raises(ValueError, match=r"between 1 and the number of training samples \(24\), got 25"):
        dm.sample_inputs(25)
    with pytest.raises(ValueError, match=r"'train', 'val', 'test'"):
        dm.dataset("holdout")


# ---------------------------------------------------------------------------------------------------------
# Regression tasks
# ---------------------------------------------------------------------------------------------------------


def make_regression(**kwargs: object) -> SyntheticRegressionDataModule:
    config = {"num_train": 400, "num_val": 50, "num_test": 50, "batch_size": 50}
    config.update(kwargs)
    return SyntheticRegressionDataModule(**config)


def test_regression_same_seed_same_data_other_seed_other_data() -> None:
    a, b = make_regression().dataset("train").tensors, make_regression().dataset("train").tensors
    assert all(torch.equal(a[key], b[key]) for key in a)
    other = make_regression(seed=1).dataset("train").tensors
    assert not torch.equal(a["image"], other["image"])
    assert not torch.equal(a["bent_0"], other["bent_0"])
    dm = make_regression()
    assert not torch.equal(dm.dataset("val").tensors["image"], dm.dataset("test").tensors["image"])
    assert not torch.equal(dm.dataset("train").tensors["image"][:50], dm.dataset("val").tensors["image"])


def test_regression_names_groups_shapes_and_standardisation() -> None:
    dm = make_regression(tasks_per_group=[1, 2, 3], input_dim=10, output_dim=4)
    assert dm.groups == [["bent_0"], ["square_0", "square_1"], ["sinc_0", "sinc_1", "sinc_2"]]
    assert dm.task_names == [name for group in dm.groups for name in group]
    assert [(t.kind, t.name, t.out_channels, t.scale) for t in dm.tasks] == [
        ("regression", name, 4, 1.0) for name in dm.task_names
    ]
    assert dm.input_shape == (10,)
    sample = dm.dataset("val")[0]
    assert set(sample) == {"image", *dm.task_names}
    assert sample["image"].shape == (10,) and sample["image"].dtype == torch.float32
    assert all(sample[name].shape == (4,) and sample[name].dtype == torch.float32 for name in dm.task_names)
    train = dm.dataset("train").tensors
    for name in dm.task_names:
        assert torch.allclose(train[name].mean(dim=0), torch.zeros(4), atol=1e-5)
        assert torch.allclose(train[name].std(dim=0), torch.ones(4), atol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(sample) and batch["image"].shape == (50, 10)


def test_repeated_activations_get_unique_names() -> None:
    dm = make_regression(activations=["sin", "sin", "sin"], scale_multipliers=[1, 2, 3], tasks_per_group=2)
    assert dm.groups == [["sin0_0", "sin0_1"], ["sin1_0", "sin1_1"], ["sin2_0", "sin2_1"]]


@pytest.mark.parametrize("activations", [["bent", "square", "sinc"], ["sin", "bent", "square"]])
def test_tasks_within_a_group_are_more_correlated_than_across(activations: list[str]) -> None:
    dm = make_regression(activations=activations, num_train=4000)
    data = dm.dataset("train").tensors
    targets = torch.stack([data[name] for name in dm.task_names])  # already standardised per output
    corr = torch.einsum("tnj,unj->tu", targets, targets) / (targets.shape[1] - 1) / targets.shape[2]
    group = torch.tensor([g for g, names in enumerate(dm.groups) for _ in names])
    same = group[:, None] == group[None, :]
    off_diagonal = ~torch.eye(len(group), dtype=torch.bool)
    within, across = corr[same & off_diagonal], corr[~same]
    assert within.min() > across.max() + 0.1


def test_activations_on_hand_values() -> None:
    x = torch.tensor([0.0, 1.0, -1.0, math.pi, -3.0])
    assert torch.allclose(ACTIVATIONS["square"](x), torch.tensor([0.0, 1.0, 1.0, math.pi**2, 9.0]))
    root2 = math.sqrt(2)
    bent_pi = math.pi + (math.sqrt(math.pi**2 + 1) - 1) / 2
    bent = torch.tensor([0.0, 1 + (root2 - 1) / 2, -1 + (root2 - 1) / 2, bent_pi])
    assert torch.allclose(ACTIVATIONS["bent"](x[:4]), bent)
    sinc = torch.tensor([1.0, math.sin(1.0), math.sin(1.0), 0.0, math.sin(3.0) / 3])
    assert torch.allclose(ACTIVATIONS["sinc"](x), sinc, atol=1e-6)
    assert torch.allclose(ACTIVATIONS["sin"](x), x.sin()) and torch.allclose(ACTIVATIONS["cos"](x), x.cos())


def test_targets_apply_the_claimed_activation() -> None:
    dm = make_regression(activations=["square", "sinc", "cos", "sin", "bent"], tasks_per_group=1)
    data = dm.dataset("train").tensors
    stored = dm.targets(data["image"])
    assert all(torch.equal(stored[name], data[name]) for name in dm.task_names)
    z = torch.randn(64, dm.input_dim, generator=torch.Generator().manual_seed(5))
    plus, minus = dm.targets(z), dm.targets(-z)
    for even in ("square_0", "sinc_0", "cos_0"):
        assert torch.allclose(plus[even], minus[even], atol=1e-4)
    odd_sum = plus["sin_0"] + minus["sin_0"]  # -2 mean / std per output after standardisation
    assert torch.allclose(odd_sum, odd_sum[:1].expand_as(odd_sum), atol=1e-4)
    assert not torch.allclose(plus["bent_0"], minus["bent_0"], atol=0.1)
    bent_sum = plus["bent_0"] + minus["bent_0"]
    assert not torch.allclose(bent_sum, bent_sum[:1].expand_as(bent_sum), atol=0.1)


def test_regression_sample_inputs() -> None:
    dm = make_regression()
    picked = dm.sample_inputs(7, seed=1)
    assert picked.shape == (7, 64)
    assert torch.equal(picked, dm.sample_inputs(7, seed=1))
    assert not torch.equal(picked, dm.sample_inputs(7, seed=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activations": ["relu"]}, r"relu.*sin.*square.*bent.*cos.*sinc"),
        ({"activations": []}, r"non-empty"),
        ({"tasks_per_group": 0}, r"tasks_per_group 0"),
        ({"tasks_per_group": [1, 2]}, r"one positive int per activation \(3\)"),
        ({"scale_multipliers": [1.0, 2.0]}, r"scale_multipliers \[1.0, 2.0\]"),
        ({"scale_multipliers": [1.0, 0.0, 1.0]}, r"positive"),
        ({"input_dim": 0}, r"input_dim must be at least 1, got 0"),
        ({"output_dim": -2}, r"output_dim must be at least 1, got -2"),
        ({"num_test": 0}, r"num_test must be at least 1"),
        ({"batch_size": 0}, r"batch_size must be at least 1"),
        ({"phi": 0.0}, r"phi must be a positive"),
    ],
)
def test_regression_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_regression(**kwargs)
