"""Retraining a found tree (``dymu.baselines.retrain``), the architecture evaluation's stage, and the test loop that
scores fixed networks with the tasks' metrics as well as their losses."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from dymu.backbones.base import Backbone
from dymu.baselines.retrain import RetrainedTreeNet, tree_from_checkpoint
from dymu.search_space import Architecture, as_architecture
from dymu.tasks import Task
from lightning_modules.base import INITS, FoundTreeMixin, StageModule, check_tree_init, default_optimizer
from lightning_modules.evaluation import ModulesEvaluation

TREE_STAGES = ("edge", "weight", "ltb", "bmtas")
"""Stages whose checkpoint ``tree_from: {stage: ...}`` may name (each one a ``<stage>_checkpoint`` argument)."""


def resolve_tree(architecture: Sequence[Sequence[int]] | None, tree_from: Mapping[str, Any] | None,
                 checkpoints: Mapping[str, str | None]) -> tuple[Architecture, dict[str, Any]]:
    """The tree to retrain and a record of where it came from.

    Args:
        architecture: a tree given as parent lists (``Architecture.to_list``).
        tree_from: ``{stage: <name>}`` (the checkpoint of that stage in ``checkpoints``) or ``{checkpoint: <path>}``,
            with ``preference`` (default uniform) and ``c`` for a controllable model's tree
            (``dymu.baselines.retrain.tree_from_checkpoint``).
        checkpoints: stage name -> its checkpoint path (or None when not given).
    """
    if (architecture is None) == (tree_from is None):
        raise ValueError("give the tree to retrain either as architecture (parent lists) or as tree_from "
                         "({stage: edge|weight|ltb|bmtas, c: ...} or {checkpoint: <path>, ...}), not both or neither")
    if architecture is not None:
        tree = as_architecture(architecture)
        return tree, {"architecture": tree.to_list()}
    assert tree_from is not None
    unknown = sorted(set(tree_from) - {"stage", "checkpoint", "preference", "c"})
    if unknown or ("stage" in tree_from) == ("checkpoint" in tree_from):
        raise ValueError(f"tree_from {dict(tree_from)} must name one of 'stage' or 'checkpoint' (and optionally "
                         f"'preference' and 'c'){'; unknown keys ' + str(unknown) if unknown else ''}")
    path = tree_from.get("checkpoint")
    if "stage" in tree_from:
        stage = tree_from["stage"]
        if stage not in checkpoints:
            raise ValueError(f"tree_from.stage must be one of {sorted(checkpoints)}, got {stage!r}")
        path = checkpoints[stage]
        if path is None:
            raise ValueError(f"tree_from names the {stage} stage but {stage}_checkpoint is not set")
    preference, c = tree_from.get("preference"), tree_from.get("c")
    tree = tree_from_checkpoint(str(path), preference, c)
    source = {**dict(tree_from), "checkpoint": str(Path(str(path)).resolve())}
    return tree, source


class TreeRetraining(FoundTreeMixin, StageModule):
    """Trains one fixed tree (``RetrainedTreeNet``) on the uniform preference's objective ``(1/N) sum_t w_t L_t``
    (``StageModule``'s preference objective at the uniform preference, the tree searches' objective), from the
    anchor's weights or from scratch.

    The tree is given as parent lists (``architecture``) or read from a parent stage's checkpoint when the model is
    built (``tree_from``: ``{stage: edge, c: 0.0}`` for ours at the uniform preference, ``{stage: ltb}``,
    ``{stage: bmtas}``, or ``{checkpoint: <path>, ...}``), so a pipeline can declare the retraining before its
    parents have found their trees. The checkpoint stores the tree (``dymu.baselines.ltb.found_architecture``
    reads it) and its source.

    Args:
        backbone: one stream's blocks and heads; default: the anchor checkpoint's.
        task_configs: task configs (linked from the data module); must match the anchor's.
        input_shape: one input's shape (linked from the data module), for the cost; default: the anchor's.
        architecture: the tree as parent lists; or
        tree_from: where to read it (see above; ``preference`` defaults to uniform).
        init: ``"anchor"`` (the used nodes and heads start as the anchor's) or ``"scratch"`` (the backbone's
            initialisation).
        anchor_checkpoint: a DYMU anchor stage checkpoint (needed for ``init="anchor"`` and ``loss_scales="anchor"``).
        edge_checkpoint, weight_checkpoint, ltb_checkpoint, bmtas_checkpoint: the parents ``tree_from.stage`` names.
        loss_scales: ``"config"`` (the tasks' ``w_t``) or ``"anchor"`` (``1 / L_t(anchor)``).
        optimizer, lr_scheduler: factories (the scheduler steps every training step).
        seed: kept for the stage runner's seeding.
    """

    stage_name = "retrain"

    def __init__(self, backbone: Backbone | None = None, task_configs: Sequence[dict[str, Any]] | None = None,
                 input_shape: Sequence[int] | None = None, architecture: list[list[int]] | None = None,
                 tree_from: dict[str, Any] | None = None, init: str = "anchor", anchor_checkpoint: str | None = None,
                 edge_checkpoint: str | None = None, weight_checkpoint: str | None = None,
                 ltb_checkpoint: str | None = None, bmtas_checkpoint: str | None = None, loss_scales: str = "config",
                 optimizer: OptimizerCallable = default_optimizer, lr_scheduler: LRSchedulerCallable | None = None,
                 seed: int = 0) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, loss_scales=loss_scales,
                         scales_checkpoint=anchor_checkpoint)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "seed"])
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        checkpoints = {"edge": edge_checkpoint, "weight": weight_checkpoint, "ltb": ltb_checkpoint,
                       "bmtas": bmtas_checkpoint}
        tree, source = resolve_tree(architecture, tree_from, checkpoints)
        check_tree_init(self.stage_name, init, anchor_checkpoint, backbone, task_configs)
        self.anchor_checkpoint, self.init = anchor_checkpoint, init
        self.backbone, self.input_shape = backbone, input_shape
        self.sizes = {"architecture": tree.to_list(), "source": {**source, "init": init}}
        self.configure_stage(task_configs, parent=anchor_checkpoint, backbone=backbone)

    def configure_models(self, parent: dict[str, Any] | None) -> None:
        self.model = self.build_supergraph(RetrainedTreeNet, parent, self.backbone,  # type: ignore[arg-type]
                                           self.input_shape, self.init, **self.sizes)

    # training_step, validation: StageModule's, at the uniform preference; the tree is fixed, so the validation
    # logs the task metrics only


class TaskMetricsEvaluation(ModulesEvaluation):
    """``ModulesEvaluation`` that also feeds every network's outputs to each task's torchmetrics metric
    (``Task.make_metric``), from the forward whose losses are summed: one pass over the test set gives both.

    After ``Trainer.test``: ``losses`` as ``ModulesEvaluation``'s, and ``metrics`` (configuration key -> one value
    per task, in task order; computed over every DDP process by torchmetrics).
    """

    def __init__(self, networks: Mapping[Hashable, nn.Module], tasks: Sequence[Task]) -> None:
        super().__init__(networks, tasks)
        self.task_metrics = nn.ModuleList([nn.ModuleDict({t.name: t.make_metric() for t in self.tasks})
                                           for _ in self.keys])
        self.metrics: dict[Hashable, list[float]] | None = None
        self._outputs: dict[int, dict[str, Tensor]] = {}

    def build_forwards(self) -> dict[Hashable, Callable[[Tensor], dict[str, Tensor]]]:
        def recording(index: int, net: nn.Module) -> Callable[[Tensor], dict[str, Tensor]]:
            def forward(x: Tensor) -> dict[str, Tensor]:
                self._outputs[index] = net(x)
                return self._outputs[index]
            return forward

        return {key: recording(i, net.eval()) for i, (key, net) in enumerate(zip(self.keys, self.networks))}

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        for i, metrics in enumerate(self.task_metrics):
            for task in self.tasks:
                task.update_metric(metrics[task.name], self._outputs[i][task.name], batch[task.name])
        self._outputs.clear()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.metrics = {key: [float(metrics[t.name].compute()) for t in self.tasks]
                        for key, metrics in zip(self.keys, self.task_metrics)}
        for metrics in self.task_metrics:
            for metric in metrics.values():
                metric.reset()
