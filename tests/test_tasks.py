"""Task losses and metrics against hand values; support-weighted data-set losses."""

from __future__ import annotations

import math

import pytest
import torch

from dymu.evaluation import mean_task_losses
from dymu.tasks import IGNORE_INDEX, MaxThresholdIoU, make_task, task_losses, weighted_bce

LN2 = math.log(2.0)


def test_weighted_bce_fixed_positive_weight() -> None:
    logits, target = torch.zeros(2), torch.tensor([1.0, 0.0])
    # mean of w * BCE: (0.95 ln2 + 0.05 ln2) / 2
    assert weighted_bce(logits, target, 0.95).item() == pytest.approx(LN2 / 2)


def test_weighted_bce_balanced_uses_the_batch_frequencies() -> None:
    logits, target = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0])
    # one positive of four: positives weigh 0.75, negatives 0.25 -> (0.75 + 3 * 0.25) ln2 / 4
    assert weighted_bce(logits, target, None).item() == pytest.approx(1.5 * LN2 / 4)


def test_weighted_bce_ignores_255_and_handles_all_ignored() -> None:
    logits = torch.tensor([0.0, 0.0, 50.0])
    target = torch.tensor([1.0, 0.0, float(IGNORE_INDEX)])
    assert weighted_bce(logits, target, 0.95).item() == pytest.approx(LN2 / 2)
    all_ignored = weighted_bce(torch.ones(3, requires_grad=True), torch.full((3,), 255.0), 0.95)
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad


def test_saliency_task_loss_and_support() -> None:
    task = make_task("saliency", scale=5)
    assert task.out_channels == 1 and task.scale == 5 and task.higher_is_better
    target = torch.tensor([[[[1.0, 0.0], [0.0, 255.0]]]])
    pred = torch.zeros(1, 1, 2, 2)
    # valid pixels: one positive of three -> positives 2/3, negatives 1/3 -> (2/3 + 2/3) ln2 / 3
    assert task.loss(pred, target).item() == pytest.approx(4 / 9 * LN2)
    assert task.support(target) == 3


def test_max_threshold_iou_hand_values() -> None:
    metric = MaxThresholdIoU(thresholds=torch.tensor([0.25, 0.5, 0.75]))
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    # image 1: probabilities 0.3, 0.6, 0.8 on pixels whose truth is 0, 1, 1 (+ an ignored pixel)
    pred1 = torch.tensor([[logit(0.3), logit(0.6), logit(0.8), logit(0.9)]]).view(1, 1, 1, 4)
    gt1 = torch.tensor([0.0, 1.0, 1.0, 255.0]).view(1, 1, 1, 4)
    # image 2: nothing salient, nothing predicted above 0.5
    pred2 = torch.tensor([[logit(0.4), logit(0.1), logit(0.1), logit(0.1)]]).view(1, 1, 1, 4)
    gt2 = torch.zeros(1, 1, 1, 4)
    metric.update(torch.cat([pred1, pred2]), torch.cat([gt1, gt2]))
    # thr 0.25: img1 IoU 2/3, img2 IoU 0/1 = 0 -> 1/3; thr 0.5: img1 1, img2 empty/empty = 1 -> 1;
    # thr 0.75: img1 1/2, img2 1 -> 0.75. Max = 1.
    assert metric.compute().item() == pytest.approx(1.0)
    assert metric.iou_sum.tolist() == pytest.approx([2 / 3, 2.0, 1.5])


def test_semseg_and_edges_support_count_valid_pixels() -> None:
    semseg = make_task("semseg", out_channels=3)
    assert semseg.support(torch.tensor([[0, 255], [2, 1]])) == 3
    normals = make_task("normals")
    target = torch.zeros(1, 3, 1, 2)
    target[0, 2, 0, 0] = 1.0
    assert normals.support(target) == 3  # one valid pixel, three components
    assert make_task("depth").support(torch.tensor([[[[0.0, 2.0, 3.0]]]])) == 2
    assert make_task("classification", out_channels=5).support(torch.tensor([1, 255, 4])) == 2


def test_mean_task_losses_weights_batches_by_support() -> None:
    """The data-set loss equals the loss over all samples at once, even when batches hold different
    numbers of a task's labelled samples (CIFAR-100's tasks share batches)."""
    tasks = [make_task("classification", name="a", out_channels=3),
             make_task("classification", name="b", out_channels=3)]
    torch.manual_seed(0)
    logits = {"a": torch.randn(10, 3), "b": torch.randn(10, 3)}
    labels_a = torch.tensor([0, 1, 2, 255, 255, 255, 255, 255, 255, 1])
    labels_b = torch.tensor([255, 255, 255, 0, 1, 2, 0, 1, 2, 255])
    everything = {"image": torch.arange(10), "a": labels_a, "b": labels_b}
    expected = task_losses(tasks, logits, everything)
    batches = [{k: v[:3] for k, v in everything.items()}, {k: v[3:] for k, v in everything.items()}]
    forward = lambda idx: {name: value[idx] for name, value in logits.items()}  # noqa: E731
    got = mean_task_losses(forward, batches, tasks)
    assert torch.allclose(got, expected, atol=1e-6)


def test_mean_task_losses_rejects_a_task_without_targets() -> None:
    tasks = [make_task("classification", name="a", out_channels=2)]
    batch = {"image": torch.arange(2), "a": torch.tensor([255, 255])}
    with pytest.raises(ValueError, match="no valid target for task"):
        mean_task_losses(lambda idx: {"a": torch.zeros(2, 2)}, [batch], tasks)


def test_every_loss_is_zero_not_nan_when_all_targets_are_ignored() -> None:
    """A PASCAL-Context crop without a person has only ignored parts pixels; the loss must stay finite."""
    cases = {
        "semseg": (torch.randn(2, 7, 4, 4), torch.full((2, 4, 4), 255)),
        "edges": (torch.randn(2, 1, 4, 4), torch.full((2, 1, 4, 4), 255.0)),
        "saliency": (torch.randn(2, 1, 4, 4), torch.full((2, 1, 4, 4), 255.0)),
        "normals": (torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
        "depth": (torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)),
        "classification": (torch.randn(3, 5), torch.full((3,), 255)),
    }
    for kind, (pred, target) in cases.items():
        task = make_task(kind, out_channels=pred.shape[1] if kind in ("semseg", "classification") else None)
        pred.requires_grad_(True)
        loss = task.loss(pred, target)
        assert loss.item() == 0.0 and loss.requires_grad, kind
        assert task.support(target) == 0, kind
