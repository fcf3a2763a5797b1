"""What the baselines share: the shared multi-task network they all run, and the interface the evaluation
uses for every one of them.

The shared network is the anchor specialised to ``Architecture.shared(N, L)``: one stream's L blocks used by
all N tasks, then the N heads, the cheapest tree of DYMU's search space. Static multi-task networks, PHN and
PHN-BN all run it (PHN on generated weights, PHN-BN with predicted BatchNorm shifts).

Interface (``BaselineModel``): ``forward(x, r) -> {task: output}`` (``r``: a task preference; networks that
do not depend on it ignore it, and no baseline has a cost input ``c``), ``cost() -> {"params", "flops"}`` of
the network that runs at inference (batch 1, ``torch.utils.flop_counter``), ``control_parameters()`` (the
hypernet's parameters; 0 for a static network) and ``from_checkpoint(path)`` (``weights_only=True``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dymu.anchor import AnchorNet, SpecializedNet, count_flops, count_parameters
from dymu.backbones.base import Backbone, build_backbone
from dymu.checkpoint import META_KEY, load_checkpoint, submodule_state
from dymu.preference import Preference
from dymu.search_space import Architecture
from dymu.tasks import Task, tasks_from_config

BN_STATISTICS = ("running", "batch")
"""``running``: BatchNorms normalise with running statistics in eval mode (the usual); ``batch``: with the
statistics of the batch they see, in train and eval mode alike (``dymu.anchor.use_batch_statistics``)."""

BN_STATISTIC_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

KIND_MODULES = {"static": "dymu.baselines.static", "phn": "dymu.baselines.phn", "phn_bn": "dymu.baselines.phn_bn",
                "ltb": "dymu.baselines.ltb", "bmtas": "dymu.baselines.bmtas",
                "feature_partitioning": "dymu.baselines.feature_partitioning", "retrain": "dymu.baselines.retrain"}
"""Baseline kind (recorded in every baseline checkpoint) -> the module that defines its model."""

_REGISTRY: dict[str, type[BaselineModel]] = {}


def shared_network(backbone: Backbone, tasks: Sequence[Task]) -> SpecializedNet:
    """One stream's L blocks shared by all N tasks, then the N heads (fresh weights): the anchor net
    specialised to ``Architecture.shared(N, L)``. Its blocks are keyed ``"{layer}_0"``."""
    anchor = AnchorNet(backbone, tasks)
    return anchor.specialize(Architecture.shared(anchor.n_tasks, anchor.n_layers))


def check_bn_statistics(value: str) -> str:
    if value not in BN_STATISTICS:
        raise ValueError(f"bn_statistics must be one of {BN_STATISTICS}, got {value!r}")
    return value


def all_batchnorms(module: nn.Module, heads: bool = True) -> dict[str, int]:
    """Names and channel counts of the BatchNorms of a shared network: its blocks' and (``heads``) its heads'."""
    return {name: m.num_features for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (heads or not name.startswith("heads."))}


def strip_parameters(module: nn.Module) -> dict[str, Tensor]:
    """Remove every parameter from ``module`` and return their values by name (``named_parameters`` order).

    The module keeps its structure and buffers; it then runs only through ``torch.func.functional_call``
    with a value for every removed parameter (the attributes read ``None`` otherwise).
    """
    values = {name: p.detach().clone() for name, p in module.named_parameters()}
    for sub in module.modules():
        for name in [n for n, p in sub._parameters.items() if p is not None]:
            del sub._parameters[name]
            object.__setattr__(sub, name, None)
    return values


def restore_parameters(module: nn.Module, values: Mapping[str, Tensor]) -> nn.Module:
    """Inverse of ``strip_parameters``: register ``values`` (detached copies) as the module's parameters."""
    for name, value in values.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        if getattr(sub, leaf, None) is not None or leaf in sub._parameters:
            raise ValueError(f"{name!r} is not a stripped parameter of this module")
        sub.__dict__.pop(leaf, None)
        sub.register_parameter(leaf, nn.Parameter(value.detach().clone()))
    return module


def baseline_class(kind: str) -> type[BaselineModel]:
    """The model class of a baseline kind (``static``, ``phn``, ``phn_bn``)."""
    if kind not in KIND_MODULES:
        raise ValueError(f"unknown baseline kind {kind!r}; known: {sorted(KIND_MODULES)}")
    importlib.import_module(KIND_MODULES[kind])
    return _REGISTRY[kind]


class BaselineModel(nn.Module):
    """Base class of the baseline models: task bookkeeping, config, checkpoint loading, cost.

    Subclasses set ``kind``, take ``(backbone, tasks, input_shape, **sizes)`` in ``__init__`` and return
    those ``sizes`` from ``size_args``; they implement ``forward(x, r, c=None)`` and
    ``inference_network()``.

    Args:
        backbone: how one stream is cut into blocks, and the heads.
        tasks: the N tasks, in head order.
        input_shape: shape of one input (no batch), for ``cost``.
    """

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a multi-task network needs at least one task")
        self.backbone_config = backbone.config()
        self.task_configs = [t.to_config() for t in tasks]
        self.task_names = [t.name for t in tasks]
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    @property
    def tasks(self) -> list[str]:
        return list(self.task_names)

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def size_args(self) -> dict[str, Any]:
        """The subclass's own constructor arguments (stored in checkpoints)."""
        return {}

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (stored in the stage checkpoint's metadata)."""
        return {"baseline": self.kind, "backbone": self.backbone_config, "tasks": self.task_configs,
                "input_shape": list(self.input_shape) if self.input_shape else None, "sizes": self.size_args()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BaselineModel:
        model_cls = baseline_class(str(config.get("baseline")))
        return model_cls(build_backbone(config["backbone"]), tasks_from_config(list(config["tasks"])),
                         input_shape=config.get("input_shape"), **dict(config.get("sizes") or {}))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> BaselineModel:
        """The model of a baseline stage's checkpoint (read with ``weights_only=True``), in eval mode.

        Raises:
            ValueError: the checkpoint holds no baseline, or (called on a subclass) another kind of baseline.
        """
        ckpt = load_checkpoint(path)
        config = ckpt[META_KEY]["model"]
        kind = config.get("baseline")
        if kind is None:
            raise ValueError(f"{path} holds no baseline model (stage {ckpt[META_KEY].get('stage')!r}); load it with "
                             "dymu.model.DynamicMultiTaskModel.from_checkpoint")
        if cls.kind and kind != cls.kind:
            raise ValueError(f"{path} holds a {kind!r} baseline, not {cls.kind!r}; load it with "
                             f"{baseline_class(kind).__name__}.from_checkpoint or dymu.baselines.base.load_baseline")
        model = cls.from_config(config)
        model.load_state_dict(submodule_state(ckpt["state_dict"], "model"))
        return model.eval()

    def preference_r(self, r: Sequence[float] | Tensor | Preference, device: torch.device | None = None) -> Tensor:
        """A validated task preference as an ``(N,)`` tensor (a ``Preference``'s ``c`` is ignored)."""
        pref = r if isinstance(r, Preference) else Preference.create(r, 0.0)
        pref.check_n_tasks(self.n_tasks)
        return pref.r_tensor(device=device)

    def inference_network(self) -> nn.Module:
        """The plain ``nn.Module`` that runs at inference (whose parameters and FLOPs ``cost`` counts)."""
        raise NotImplementedError

    def cost(self, r: Any = None, c: Any = None) -> dict[str, int]:
        """``params`` and ``flops`` (per input, ``torch.utils.flop_counter``) of the inference network. The
        preference arguments are accepted for the evaluation's sake and ignored: the network is fixed."""
        if self.input_shape is None:
            raise RuntimeError("cost needs the input shape: build the model with input_shape=...")
        net = self.inference_network()
        was_training = net.training
        net.eval()
        param = next(iter(net.parameters()))
        # batch 2 then halved: BatchNorms on batch statistics need more than one value per channel
        x = torch.zeros(2, *self.input_shape, device=param.device, dtype=param.dtype)
        flops = count_flops(lambda: net(x)) // 2
        net.train(was_training)
        return {"params": count_parameters(net), "flops": flops}

    def control_parameters(self) -> int:
        """Parameters of the hypernet (0 for a network that does not depend on the preference)."""
        return 0


def load_baseline(path: str | Path) -> BaselineModel:
    """Any baseline stage's checkpoint as its model (the kind is read from the checkpoint)."""
    return BaselineModel.from_checkpoint(path)


class BoundPreference(nn.Module):
    """A preference-conditioned baseline fixed at one preference: ``forward(x) = model(x, r)``."""

    def __init__(self, model: BaselineModel, r: Sequence[float]) -> None:
        super().__init__()
        self.model, self.r = model, list(r)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.model(x, self.r)


def preference_network(model: BaselineModel, r: Sequence[float]) -> nn.Module:
    """The network a baseline runs for ``r``: PHN's generated network is materialised once; others are bound."""
    materialize = getattr(model, "materialize", None)
    return materialize(list(r)) if materialize is not None else BoundPreference(model, r)
