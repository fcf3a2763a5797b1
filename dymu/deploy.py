"""Serving one preference: a lean static network with its BatchNorms folded, and its export.

``fold_batchnorms`` folds every BatchNorm that directly follows a convolution or linear layer into that layer
(eval-mode semantics: ``gamma (W x + b - mean) / sqrt(var + eps) + beta``) and drops it. The pairs are found from the
module structure only, where the conv's output provably goes to the BatchNorm alone: adjacent entries of an
``nn.Sequential`` (every conv-BN of the dymu backbones and torchvision's MobileNetV2) and the ``convK``/``bnK``
pairs of torchvision's ``BasicBlock`` and ``Bottleneck``. A BatchNorm that normalises with batch statistics
(no running statistics) is left as it is.

``LeanNet`` is a specialised tree (``AnchorNet.specialize``) with its routing fixed at construction as a flat
plan (which block reads which block's output) and no parameter or buffer that the forward does not use.
``export_model`` writes it as ONNX (the dynamo exporter), TorchScript (``torch.jit.trace``) or a PT2 archive
(``torch.export``), with a dynamic batch dimension, and ``run_exported`` runs such a file again (ONNX Runtime
for ONNX) to check it.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dymu.anchor import SpecializedNet
from dymu.search_space import Architecture

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
EXPORT_FORMATS = ("onnx", "torchscript", "pt2")
DEPLOY_EXTRA = "pip install 'dymu[deploy]'"


class MissingDependency(ValueError):
    """An optional package that a deploy format needs is not installed (a user error: one line, exit 1)."""


def _torchvision_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` attribute names of a torchvision residual block whose forward is known."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return []
    if isinstance(module, BasicBlock):
        return [("conv1", "bn1"), ("conv2", "bn2")]
    if isinstance(module, Bottleneck):
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    return []


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(layer, FOLDABLE) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.running_mean is not None and bn.running_var is not None
            and (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == bn.num_features)


class ChannelBias(nn.Module):
    """``x + bias`` per channel (dim 1) of an ``N, C, *spatial`` input: the bias of a folded dilated convolution,
    added after it (see ``folded_pair``)."""

    def __init__(self, bias: Tensor, spatial_dims: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)
        self.shape = (1, -1, *[1] * spatial_dims)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.reshape(self.shape)


def _dilated(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvNd) and any(d != 1 for d in layer.dilation)


@torch.no_grad()
def folded_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[nn.Module, nn.Module]:
    """What replaces ``layer`` (conv or linear) and ``bn``: together they compute ``bn(layer(x))`` in eval mode
    (folded in float64, then cast back to the layer's dtype).

    Usually the folded layer with a bias, and ``nn.Identity`` for ``bn``. A dilated convolution instead stays
    bias-free and the bias is added after it (``ChannelBias`` in ``bn``'s place): where oneDNN is not used (on
    CPU a float input of batch 1 with a small image and a 3x3 kernel) PyTorch runs a dilated convolution as
    ``slow_conv_dilated2d``, which adds a bias channel by channel (a ``select`` and a ``fill_`` per output
    channel, about 500 small ops per 512-channel convolution), while one broadcast add is a single op."""
    new = copy.deepcopy(layer)
    weight = layer.weight.detach().double()
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    new.weight = nn.Parameter((weight * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(layer.weight.dtype))
    folded_bias = (bias * scale + shift).to(layer.weight.dtype)
    if _dilated(layer):
        new.bias = None
        return new, ChannelBias(folded_bias, weight.dim() - 2)
    new.bias = nn.Parameter(folded_bias)
    return new, nn.Identity()


def fold_batchnorms(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm that directly follows a conv or linear layer into it. Only valid for eval
    mode; returns the number of BatchNorms folded.

    The BatchNorm is removed from an ``nn.Sequential`` (no module call left for it: 2 to 7 % of a batch-1
    forward on CPU, docs/performance.md), and becomes ``nn.Identity`` in a torchvision block, whose forward
    calls it by name; a dilated convolution's bias takes its place instead (``folded_pair``)."""
    pairs: list[tuple[nn.Module, str, str]] = []
    for parent in module.modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            pairs += [(parent, a, b) for a, b in zip(names[:-1], names[1:])]
        pairs += [(parent, a, b) for a, b in _torchvision_pairs(parent)]
    folded = 0
    for parent, a, b in pairs:
        layer, bn = parent._modules.get(a), parent._modules.get(b)
        if layer is not None and bn is not None and _foldable(layer, bn):
            new, after = folded_pair(layer, bn)
            setattr(parent, a, new)
            if isinstance(after, nn.Identity) and isinstance(parent, nn.Sequential):
                del parent._modules[b]
            else:
                setattr(parent, b, after)
            folded += 1
    return folded


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class LeanNet(SpecializedNet):
    """A specialised tree with a flat routing plan: ``plan[i] = (block key, parent block key or None)`` in
    execution order, and per task the block keys of its path. Outputs a dict (task -> prediction), or a tuple in
    task order with ``tuple_outputs`` (for the exporters). Build it with ``LeanNet.create``."""

    def __init__(self, blocks: nn.ModuleDict, heads: nn.ModuleList, architecture: Architecture,
                 task_names: Sequence[str], tuple_outputs: bool = False) -> None:
        super().__init__(blocks, heads, architecture, task_names)
        used = architecture.used_nodes()
        plan: list[tuple[str, str | None]] = [(f"0_{t}", None) for t in sorted(used[0])]
        for k in range(1, architecture.n_layers):
            plan += [(f"{k}_{j}", f"{k - 1}_{architecture.parents[k - 1][j]}") for j in sorted(used[k])]
        self.plan = plan
        self.head_paths = [[f"{k}_{s}" for k, s in enumerate(architecture.path(t))]
                           for t in range(architecture.n_tasks)]
        self.tuple_outputs = tuple_outputs

    @classmethod
    def create(cls, net: SpecializedNet, fold_bn: bool = True, tuple_outputs: bool = False,
               copy_modules: bool = True) -> LeanNet:
        """A lean version of ``net`` in eval mode, its BatchNorms folded if ``fold_bn``; ``copy_modules=False``
        takes over (and changes) ``net``'s modules instead of copying them."""
        blocks, heads = (copy.deepcopy(net.blocks), copy.deepcopy(net.heads)) if copy_modules else (net.blocks,
                                                                                                  net.heads)
        lean = cls(blocks, heads, net.architecture, net.task_names, tuple_outputs)
        if fold_bn:
            lean.folded_batchnorms = fold_batchnorms(lean)
        return lean.eval()

    def forward(self, x: Tensor) -> Any:  # dict[str, Tensor] or tuple[Tensor, ...]
        features: dict[str, Tensor] = {}
        for key, parent in self.plan:
            features[key] = self.blocks[key](x if parent is None else features[parent])
        outputs = [head([x, *[features[k] for k in keys]]) for head, keys in zip(self.heads, self.head_paths)]
        return tuple(outputs) if self.tuple_outputs else dict(zip(self.task_names, outputs))


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(format: str) -> None:
    """Raise ``MissingDependency`` (naming the install command) when ``format``'s packages are missing."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if format == "onnx":
        missing = [p for p in ("onnx", "onnxscript", "onnxruntime") if not has_package(p)]
        if missing:
            raise MissingDependency(f"export format onnx needs {', '.join(missing)}, not installed: {DEPLOY_EXTRA}")


def _with_tuple_outputs(net: LeanNet) -> LeanNet:
    if net.tuple_outputs:
        return net
    out = copy.copy(net)
    out.tuple_outputs = True
    return out


def export_model(net: LeanNet, example: Tensor, path: str | Path, format: str) -> Path:
    """Write ``net`` (outputs in task order) to ``path`` as ``format`` with a dynamic batch dimension."""
    require(format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _with_tuple_outputs(net).eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings about code that is not the user's
        if format == "torchscript":
            traced = torch.jit.trace(module, (example,), check_trace=False)
            torch.jit.save(traced, str(path))
        elif format == "pt2":
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(path))
        else:
            program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                        input_names=["image"], output_names=list(net.task_names), verbose=False)
            program.save(str(path))
    return path


class ExportedModel:
    """An exported file loaded for inference: ``self(x)`` gives the outputs in task order as tensors.
    ``threads``: ONNX Runtime's intra-op threads (None: its default, every core)."""

    def __init__(self, path: str | Path, format: str, threads: int | None = None) -> None:
        require(format)
        self.path, self.format = Path(path), format
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model {self.path} does not exist")
        if format == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self._module = torch.jit.load(str(self.path), map_location="cpu").eval()
        elif format == "pt2":
            self._module = torch.export.load(str(self.path)).module()
        else:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            if threads is not None:
                options.intra_op_num_threads = threads
            self._session = onnxruntime.InferenceSession(str(self.path), options,
                                                         providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> list[Tensor]:
        if self.format == "onnx":
            outputs = self._session.run(None, {self._input: x.detach().cpu().numpy().astype(np.float32)})
            return [torch.from_numpy(np.asarray(o)) for o in outputs]
        with torch.no_grad():
            return list(self._module(x))


def max_difference(a: Sequence[Tensor], b: Sequence[Tensor]) -> dict[str, float]:
    """The largest absolute difference over all outputs, and the same divided by the largest ``|b|`` (at
    least 1)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs against {len(b)}")
    abs_err, scale = 0.0, 1.0
    for x, y in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"output shapes differ: {tuple(x.shape)} against {tuple(y.shape)}")
        abs_err = max(abs_err, float((x.double().cpu() - y.double().cpu()).abs().max()))
        scale = max(scale, float(y.double().abs().max()))
    return {"max_abs_error": abs_err, "max_rel_error": abs_err / scale}
