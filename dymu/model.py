"""The controllable model: anchor net + edge hypernet (+ weight hypernet), and its user-facing API."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dymu.anchor import AnchorNet, BNDeltas, NodeCosts, SpecializedNet, batch_statistics, batchnorm_names, cached_node_costs
from dymu.backbones.base import Backbone, build_backbone
from dymu.checkpoint import META_KEY, load_checkpoint, submodule_state
from dymu.controller import MeasuredController, most_probable_tree
from dymu.hypernets import EdgeHypernet, WeightHypernet
from dymu.preference import Preference
from dymu.search_space import Architecture
from dymu.tasks import Task, tasks_from_config


class DynamicMultiTaskModel(nn.Module):
    """One multi-task network whose architecture and BatchNorm weights follow a preference ``(r, c)``.

    Args:
        anchor: the N single-task streams.
        edge_hypernet: preference -> edge logits; without it every preference gives the anchor.
        weight_hypernet: preference -> BatchNorm shifts; without it the anchor's BatchNorms are used.
        input_shape: shape of one input (no batch), for ``cost``.
        controller: the measured controller (``dymu.controller``); when present it chooses the tree of every
            preference (exactly, from measured path losses) and the edge hypernet is its amortised copy.
    """

    def __init__(self, anchor: AnchorNet, edge_hypernet: EdgeHypernet | None = None,
                 weight_hypernet: WeightHypernet | None = None,
                 input_shape: Sequence[int] | None = None, controller: MeasuredController | None = None) -> None:
        super().__init__()
        self.anchor, self.edge_hypernet, self.weight_hypernet = anchor, edge_hypernet, weight_hypernet
        self.controller = controller
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    @classmethod
    def build(cls, backbone: Backbone, tasks: Sequence[Task], edge: dict[str, int] | None = None,
              weight: dict[str, int] | None = None, input_shape: Sequence[int] | None = None,
              controller: dict[str, Any] | None = None) -> DynamicMultiTaskModel:
        """Build fresh networks. ``edge`` / ``weight`` are the hypernets' size arguments, ``controller`` the
        measured controller's config (or None: absent)."""
        anchor = AnchorNet(backbone, tasks)
        edge_net = EdgeHypernet(anchor.n_tasks, anchor.n_layers, **edge) if edge is not None else None
        weight_net = (WeightHypernet(anchor.n_tasks, batchnorm_names(anchor), **weight)
                      if weight is not None else None)
        ctrl = MeasuredController(anchor.n_tasks, anchor.n_layers, **controller) if controller is not None else None
        return cls(anchor, edge_net, weight_net, input_shape, ctrl)

    @property
    def tasks(self) -> list[str]:
        return list(self.anchor.task_names)

    @property
    def n_tasks(self) -> int:
        return self.anchor.n_tasks

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model's networks (stored in every stage checkpoint)."""
        return {"backbone": self.anchor.backbone_config, "tasks": self.anchor.task_configs,
                "edge": self.edge_hypernet.size_args if self.edge_hypernet is not None else None,
                "weight": self.weight_hypernet.size_args if self.weight_hypernet is not None else None,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "controller": self.controller.config() if self.controller is not None else None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DynamicMultiTaskModel:
        return cls.build(build_backbone(config["backbone"]), tasks_from_config(config["tasks"]),
                         edge=config.get("edge"), weight=config.get("weight"),
                         input_shape=config.get("input_shape"), controller=config.get("controller"))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> DynamicMultiTaskModel:
        """Load any stage's checkpoint (anchor, edge or weight), read with ``weights_only=True``."""
        ckpt = load_checkpoint(path)
        model = cls.from_config(ckpt[META_KEY]["model"])
        model.load_state_dict(submodule_state(ckpt["state_dict"], "model"))
        return model.eval()

    @classmethod
    def from_run(cls, run_dir: str | Path, stage: str | None = None) -> DynamicMultiTaskModel:
        """The model of a run directory written by ``dymu run`` (the run's file names are the run layout's,
        ``dymu.layout``).

        Args:
            run_dir: the run directory.
            stage: ``None`` (default): the most complete model, the weight stage's, else the edge stage's with an
                :class:`IncompleteRunWarning` (that model lacks the weight stage's BatchNorm adaptation);
                ``"weight"``, ``"edge"`` or ``"anchor"``: that stage's finished checkpoint, without a warning.
        """
        import warnings

        path, note = run_checkpoint(run_dir, stage)
        if note is not None:
            warnings.warn(note, IncompleteRunWarning, stacklevel=2)
        return cls.from_checkpoint(path)

    def preference(self, r: Sequence[float] | Tensor | Preference, c: float | None = None) -> Preference:
        """Validate a preference for this model's tasks (raises ``ValueError`` naming the problem)."""
        if isinstance(r, Preference):
            if c is not None:
                raise ValueError("pass either a Preference or (r, c), not both")
            return Preference.create(r.r, r.c, n_tasks=self.n_tasks)
        if c is None:
            raise ValueError("the cost preference c is missing: pass c in [0, 1] (0 = accuracy, 1 = frugal)")
        return Preference.create(r, c, n_tasks=self.n_tasks)

    def _device(self) -> torch.device:
        return next(self.anchor.parameters()).device

    def edge_logits(self, pref: Preference) -> Tensor:
        if self.edge_hypernet is None:
            raise RuntimeError("this model has no edge hypernet (an anchor-stage checkpoint)")
        device = self._device()
        return self.edge_hypernet(pref.r_tensor(device=device), pref.c_tensor(device=device))

    def bn_deltas(self, pref: Preference) -> BNDeltas | None:
        if self.weight_hypernet is None:
            return None
        device = self._device()
        return self.weight_hypernet(pref.r_tensor(device=device), pref.c_tensor(device=device))

    @torch.no_grad()
    def architecture(self, r: Sequence[float] | Tensor | Preference, c: float | None = None,
                     budget: float | None = None, budget_metric: str = "params") -> Architecture:
        """The tree for ``(r, c)``.

        With a measured controller: its exact choice (``dymu.controller``). Otherwise the edge hypernet's most
        probable tree (``argmax`` of the edge logits, no noise). ``budget`` (a fraction of the anchor's
        ``budget_metric``, ``"params"`` or ``"flops"``) restricts either to the trees that cost at most that
        much; a budget below the cheapest tree (one stream) is an error.
        """
        pref = self.preference(r, c)
        if self.controller is not None:
            return self.controller.solve(pref.r_tensor(), pref.c, self.node_costs(), budget, budget_metric)
        if self.edge_hypernet is None:
            if budget is not None:
                raise ValueError("this model has no edge hypernet (an anchor-stage checkpoint): it has one tree, "
                                 "the anchor, and no budget can be applied")
            return Architecture.anchor(self.anchor.n_tasks, self.anchor.n_layers)
        if budget is None:
            return Architecture.from_logits(self.edge_logits(pref))
        return most_probable_tree(self.edge_logits(pref), self.node_costs(), budget, budget_metric)

    @property
    def bn_statistics(self) -> str:
        return self.weight_hypernet.bn_statistics if self.weight_hypernet is not None else "running"

    def run_tree(self, x: Tensor, architecture: Architecture, bn_deltas: BNDeltas | None) -> dict[str, Tensor]:
        """The anchor restricted to ``architecture``, BatchNorms shifted by ``bn_deltas`` and normalised with
        the statistics the weight hypernet was trained with."""
        use_batch = bn_deltas is not None and self.bn_statistics == "batch"
        with batch_statistics(self.anchor) if use_batch else nullcontext():
            return self.anchor(x, architecture=architecture, bn_deltas=bn_deltas)

    def forward(self, x: Tensor, r: Sequence[float] | Tensor | Preference, c: float | None = None,
                budget: float | None = None, budget_metric: str = "params") -> dict[str, Tensor]:
        """Task outputs for preference ``(r, c)`` (only the nodes of its tree are computed)."""
        pref = self.preference(r, c)
        return self.run_tree(x, self.architecture(pref, budget=budget, budget_metric=budget_metric),
                             self.bn_deltas(pref))

    @torch.no_grad()
    def specialize(self, r: Sequence[float] | Tensor | Preference, c: float | None = None,
                   budget: float | None = None, budget_metric: str = "params", fold_bn: bool = False
                   ) -> SpecializedNet:
        """A static pruned ``nn.Module`` for ``(r, c)`` (within ``budget``) whose outputs equal
        ``self(x, r, c, budget)``.

        With ``fold_bn`` it is a ``dymu.deploy.LeanNet`` in eval mode: every BatchNorm (with the weight
        hypernet's shifts baked in) folded into the conv before it, the routing a flat plan, and no parameter
        or buffer the forward does not use; its outputs equal the eval-mode model's."""
        pref = self.preference(r, c)
        deltas = self.bn_deltas(pref)
        net = self.anchor.specialize(self.architecture(pref, budget=budget, budget_metric=budget_metric), deltas,
                                     bn_statistics=self.bn_statistics if deltas is not None else "running")
        if fold_bn:
            from dymu.deploy import LeanNet

            return LeanNet.create(net, fold_bn=True, copy_modules=False)
        return net

    def node_costs(self) -> NodeCosts:
        return cached_node_costs(self.anchor, self.input_shape)

    def cost(self, r: Sequence[float] | Tensor | Preference, c: float | None = None, budget: float | None = None,
             budget_metric: str = "params") -> dict[str, int]:
        """``params`` and ``flops`` (batch 1, ``torch.utils.flop_counter``) of the pruned model for ``(r, c)``
        (within ``budget``)."""
        return self.node_costs().cost(self.architecture(r, c, budget=budget, budget_metric=budget_metric))

    def control_parameters(self) -> int:
        """Parameters of the hypernets."""
        nets = [n for n in (self.edge_hypernet, self.weight_hypernet) if n is not None]
        count = sum(p.numel() for n in nets for p in n.parameters())
        if self.controller is not None:  # its measured table and trade-off
            count += sum(b.numel() for b in self.controller.buffers())
        return count


class IncompleteRunWarning(UserWarning):
    """``from_run`` gave the edge stage's model: the run's weight stage has not finished."""


RUN_STAGES = ("weight", "edge", "anchor")
"""The stages of a run whose checkpoint ``from_run`` loads (``stage=``)."""


def run_checkpoint(run_dir: str | Path, stage: str | None = None) -> tuple[Path, str | None]:
    """The checkpoint that ``DynamicMultiTaskModel.from_run(run_dir, stage)`` loads, and one line to tell the user
    when it is not the complete model (None when it is): without ``stage``, the weight stage's, else the edge
    stage's (the line says that the weight stage's BatchNorm adaptation is missing). The commands that load a
    run (``dymu show``, ``export``, ``predict``, ``info``) print that line."""
    from dymu.layout import RunLayout

    layout = RunLayout(run_dir)
    if stage is None:
        path = layout.model_checkpoint()
        if path == layout.final("weight"):
            return path, None
        return path, (f"{layout.root} has no finished weight stage: using the edge stage's checkpoint {path}, "
                      "without the BatchNorm adaptation of the weight stage; finish the run (rerun `dymu run` "
                      "with the same --run_dir) for the complete model")
    if stage not in RUN_STAGES:
        raise ValueError(f"stage must be one of {RUN_STAGES} (or None: the most complete), got {stage!r}")
    path = layout.final(stage)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the {stage} stage of {layout.root} has not finished")
    return path, None
