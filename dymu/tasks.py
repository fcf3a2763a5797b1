"""Task definitions: one class per kind of task, each with its loss, metric, scale ``w_t`` and head size.

A task knows nothing about networks beyond how many output channels its head needs; the backbone builds
the head (``Backbone.make_head``). Targets use 255 as the ignore value for label maps, 0 for invalid depth
and the zero vector for invalid normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

IGNORE_INDEX = 255


class MeanAngularError(torchmetrics.Metric):
    """Mean angle in degrees between predicted and target normals over valid pixels (target != 0)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:  # (B, 3, H, W) each
        valid = target.abs().sum(dim=1) > 0
        cos = F.cosine_similarity(pred.float(), target.float(), dim=1).clamp(-1.0, 1.0)
        angles = torch.rad2deg(torch.acos(cos))[valid]
        self.total += angles.double().sum()
        self.count += angles.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


def weighted_bce(logits: Tensor, target: Tensor, pos_weight: float | None) -> Tensor:
    """Binary cross-entropy over the pixels whose target is not 255, positives weighted by ``pos_weight``
    and negatives by ``1 - pos_weight``; ``pos_weight=None`` balances them by the batch's own label
    frequencies (positives get the fraction of negatives)."""
    valid = target != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    x, y = logits[valid].float(), target[valid].float()
    w = (1.0 - y.mean()).detach() if pos_weight is None else torch.tensor(pos_weight, device=x.device)
    weights = w * y + (1.0 - w) * (1.0 - y)
    return F.binary_cross_entropy_with_logits(x, y, weight=weights)


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """The mean of ``values`` over ``valid`` (a boolean mask of the same shape), 0 when nothing is valid, with
    static shapes and no branch: what ``values[valid].mean()`` computes, for a captured step
    (``Task.static_loss``)."""
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1).to(values.dtype)


def weighted_bce_static(logits: Tensor, target: Tensor, pos_weight: float | None) -> Tensor:
    """``weighted_bce`` with static shapes and no branch (ignored pixels masked, not removed)."""
    valid = target != IGNORE_INDEX
    x = logits.float()
    y = torch.where(valid, target, torch.zeros_like(target)).float()
    if pos_weight is None:
        w = (1.0 - masked_mean(y, valid)).detach()
    else:
        w = torch.tensor(pos_weight, device=x.device)
    weights = w * y + (1.0 - w) * (1.0 - y)
    return masked_mean(F.binary_cross_entropy_with_logits(x, y, weight=weights, reduction="none"), valid)


def cross_entropy_static(pred: Tensor, target: Tensor) -> Tensor:
    """``F.cross_entropy`` ignoring ``IGNORE_INDEX`` (the mean over the labelled elements), 0 when none is
    labelled, without the branch that the tasks' ``loss`` needs for that case."""
    target = target.long()
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1).to(total.dtype)


class MaxThresholdIoU(torchmetrics.Metric):
    """Saliency: mean over images of the foreground IoU at each threshold of ``sigmoid(logits)``, maximised
    over the thresholds (0.2 to 0.9 in 15 steps by default). Pixels whose target is 255 are left out; an
    image whose prediction and target are both empty has IoU 1."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, thresholds: Tensor | None = None) -> None:
        super().__init__()
        self.thresholds = torch.linspace(0.2, 0.9, 15) if thresholds is None else thresholds
        self.add_state("iou_sum", default=torch.zeros(len(self.thresholds), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:  # (B, 1, H, W) each
        prob = torch.sigmoid(logits.float()).flatten(1)
        target = target.flatten(1)
        valid = target != IGNORE_INDEX
        gt = (target == 1) & valid
        pred = (prob[:, None, :] > self.thresholds.to(prob.device)[None, :, None]) & valid[:, None, :]
        inter = (pred & gt[:, None, :]).sum(-1).double()
        union = (pred | gt[:, None, :]).sum(-1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        self.iou_sum += iou.sum(0)
        self.images += target.shape[0]

    def compute(self) -> Tensor:
        return (self.iou_sum / self.images.clamp(min=1)).max().float()


@dataclass
class Task:
    """A task: name, output channels of its head, loss scale ``w_t`` and its primary metric.

    Attributes:
        name: key of the task's target in a batch and of its output in the model's dict.
        out_channels: channels (or units) the head must produce.
        scale: the loss scale ``w_t`` (docs/method.md, "Notation").
    """

    name: str
    out_channels: int
    scale: float = 1.0
    kind: str = field(default="", init=False)
    metric_name: str = field(default="", init=False)
    higher_is_better: bool = field(default=False, init=False)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The unscaled loss ``L_t`` of a batch."""
        raise NotImplementedError

    def static_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """``loss`` with static shapes and no data-dependent branch (invalid elements masked rather than
        removed), so that ``torch.compile`` captures it in one graph (``dymu.training.captured_edge_loss``);
        equal to ``loss`` up to rounding. The default is ``loss`` itself, for the tasks whose loss is static."""
        return self.loss(pred, target)

    def make_metric(self) -> torchmetrics.Metric:
        """A fresh torchmetrics metric for this task's primary measure."""
        raise NotImplementedError

    def update_metric(self, metric: torchmetrics.Metric, pred: Tensor, target: Tensor) -> None:
        """Feed one batch to ``metric`` (tasks with invalid pixels mask them here)."""
        metric.update(pred, target)

    def support(self, target: Tensor) -> int:
        """How many target elements the batch loss averages over (valid pixels, labelled samples). A data
        set's loss is the support-weighted mean of its batch losses, so batches with few valid pixels (or,
        on CIFAR-100, few images of a task) count for what they hold."""
        return int(target.shape[0])

    def to_config(self) -> dict:
        """A plain dict that ``make_task`` turns back into this task (stored in checkpoints)."""
        return {"kind": self.kind, "name": self.name, "out_channels": self.out_channels, "scale": self.scale}


@dataclass
class SemanticSegmentation(Task):
    """Per-pixel classification; target ``(B, H, W)`` long, 255 ignored. Metric: mIoU."""

    def __post_init__(self) -> None:
        self.kind, self.metric_name, self.higher_is_better = "semseg", "mIoU", True

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        # cross_entropy is NaN when every pixel is ignored (a PASCAL crop without a person for parts)
        if not (target != IGNORE_INDEX).any():
            return pred.sum() * 0.0
        return F.cross_entropy(pred, target.long(), ignore_index=IGNORE_INDEX)

    def static_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_static(pred, target)

    def make_metric(self) -> torchmetrics.Metric:
        return torchmetrics.classification.MulticlassJaccardIndex(
            num_classes=self.out_channels, ignore_index=IGNORE_INDEX, average="macro"
        )

    def update_metric(self, metric: torchmetrics.Metric, pred: Tensor, target: Tensor) -> None:
        metric.update(pred.argmax(dim=1), target.long())

    def support(self, target: Tensor) -> int:
        return int((target != IGNORE_INDEX).sum())


@dataclass
class Depth(Task):
    """Dense depth; target ``(B, 1, H, W)``, 0 = invalid. Loss: L1 over valid pixels. Metric: RMSE."""

    def __post_init__(self) -> None:
        self.kind, self.metric_name, self.higher_is_better = "depth", "RMSE", False

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        valid = target > 0
        if not valid.any():
            return pred.sum() * 0.0
        return F.l1_loss(pred[valid], target[valid])

    def static_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return masked_mean((pred - target).abs(), target > 0)

    def make_metric(self) -> torchmetrics.Metric:
        return torchmetrics.MeanSquaredError(squared=False)

    def support(self, target: Tensor) -> int:
        return int((target > 0).sum())

    def update_metric(self, metric: torchmetrics.Metric, pred: Tensor, target: Tensor) -> None:
        valid = target > 0
        metric.update(pred[valid].float(), target[valid].float())


@dataclass
class SurfaceNormals(Task):
    """Unit normals; target ``(B, 3, H, W)``, zero vector = invalid.

    Loss: L1 between the L2-normalised prediction and the target over valid pixels.
    Metric: mean angular error in degrees.
    """

    def __post_init__(self) -> None:
        self.kind, self.metric_name, self.higher_is_better = "normals", "mean_angle", False

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        valid = (target.abs().sum(dim=1, keepdim=True) > 0).expand_as(target)
        if not valid.any():
            return pred.sum() * 0.0
        return F.l1_loss(F.normalize(pred, dim=1)[valid], target[valid])

    def static_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        valid = (target.abs().sum(dim=1, keepdim=True) > 0).expand_as(target)
        return masked_mean((F.normalize(pred, dim=1) - target).abs(), valid)

    def make_metric(self) -> torchmetrics.Metric:
        return MeanAngularError()

    def support(self, target: Tensor) -> int:
        return int((target.abs().sum(dim=1) > 0).sum()) * target.shape[1]


@dataclass
class Edges(Task):
    """Binary edge maps; target ``(B, 1, H, W)`` in {0, 1}, 255 ignored.

    Loss: binary cross-entropy weighting positives by ``pos_weight`` (0.95) and negatives by
    ``1 - pos_weight``. Metric: that loss (as DYMU's table 7 reports), lower is better.
    """

    pos_weight: float = 0.95

    def __post_init__(self) -> None:
        self.kind, self.metric_name, self.higher_is_better = "edges", "edge_loss", False

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return weighted_bce(pred, target, self.pos_weight)

    def static_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return weighted_bce_static(pred, target, self.pos_weight)

    def make_metric(self) -> torchmetrics.Metric:
        return torchmetrics.MeanMetric()

    def update_metric(self, metric: torchmetrics.Metric, pred: Tensor, target: Tensor) -> None:
        support = self.support(target)
        if support:
            metric.update(self.loss(pred, target).detach(), weight=support)

    def support(self, target: Tensor) -> int:
        return int((target != IGNORE_INDEX).sum())

    def to_config(self) -> dict:
        return {**super().to_config(), "pos_weight": self.pos_weight}


@dataclass
class Saliency(Task):
    """Binary saliency maps; target ``(B, 1, H, W)`` in {0, 1}, 255 ignored.

    Loss: class-balanced binary cross-entropy (``weighted_bce`` with ``pos_weight=None``).
    Metric: max-over-thresholds mean IoU (``MaxThresholdIoU``).
    """

    def __post_init__(self) -> None:
        self.kind, self.metric_name, self.higher_is_better = "saliency", "maxIoU", True

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return weighted_bce(pred, target, None)

    def static_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return weighted_bce_static(pred, target, None)

    def make_metric(self) -> torchmetrics.Metric:
        return MaxThresholdIoU()

    def support(self, target: Tensor) -> int:
        return int((target != IGNORE_INDEX).sum())


@dataclass
class Regression(Task):
    """Vector regression; target ``(B, D)``. Loss and metric: mean squared error."""

    def __post_init__(self) -> None:
        self.kind, self.metric_name, self.higher_is_better = "regression", "MSE", False

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target)

    def make_metric(self) -> torchmetrics.Metric:
        return torchmetrics.MeanSquaredError()


@dataclass
class Classification(Task):
    """Classification; target ``(B,)`` long, 255 ignored (a sample of another task). Metric: accuracy."""

    def __post_init__(self) -> None:
        self.kind, self.metric_name, self.higher_is_better = "classification", "accuracy", True

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if not (target != IGNORE_INDEX).any():
            return pred.sum() * 0.0
        return F.cross_entropy(pred, target.long(), ignore_index=IGNORE_INDEX)

    def static_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_static(pred, target)

    def make_metric(self) -> torchmetrics.Metric:
        return torchmetrics.classification.MulticlassAccuracy(
            num_classes=self.out_channels, ignore_index=IGNORE_INDEX, average="micro"
        )

    def support(self, target: Tensor) -> int:
        return int((target != IGNORE_INDEX).sum())


TASK_KINDS: dict[str, type[Task]] = {
    "semseg": SemanticSegmentation,
    "depth": Depth,
    "normals": SurfaceNormals,
    "edges": Edges,
    "saliency": Saliency,
    "regression": Regression,
    "classification": Classification,
}
_DEFAULT_CHANNELS = {"depth": 1, "normals": 3, "edges": 1, "saliency": 1}


def make_task(kind: str, name: str | None = None, out_channels: int | None = None, scale: float = 1.0,
              **kwargs: float) -> Task:
    """Build a task of a known kind.

    Args:
        kind: one of ``semseg, depth, normals, edges, saliency, regression, classification``.
        name: batch key and output key; defaults to ``kind``.
        out_channels: head outputs; required for semseg (classes), regression (dimension) and
            classification (classes); fixed for depth (1), normals (3), edges (1) and saliency (1).
        scale: the loss scale ``w_t``.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {sorted(TASK_KINDS)}")
    if out_channels is None:
        if kind not in _DEFAULT_CHANNELS:
            raise ValueError(f"task kind {kind!r} needs out_channels (number of classes or outputs)")
        out_channels = _DEFAULT_CHANNELS[kind]
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"task scale must be a positive finite number, got {scale}")
    return TASK_KINDS[kind](name=name or kind, out_channels=int(out_channels), scale=float(scale), **kwargs)


def tasks_from_config(configs: list[dict]) -> list[Task]:
    """Inverse of ``[t.to_config() for t in tasks]``."""
    return [make_task(**dict(c)) for c in configs]


def task_losses(tasks: list[Task], outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """The unscaled losses ``[L_t]`` of a batch, ``(N,)``, in task order."""
    missing = [t.name for t in tasks if t.name not in batch]
    if missing:
        raise KeyError(f"batch has no target for tasks {missing}; batch keys: {sorted(batch)}")
    return torch.stack([t.loss(outputs[t.name], batch[t.name]) for t in tasks])


def task_scales(tasks: list[Task]) -> Tensor:
    """``[w_t]``, ``(N,)``."""
    return torch.tensor([t.scale for t in tasks])


def preference_loss(losses: Tensor, r: Tensor, scales: Tensor) -> Tensor:
    """``L_task(r) = sum_t r_t w_t L_t``."""
    return (r.to(losses) * scales.to(losses) * losses).sum()
