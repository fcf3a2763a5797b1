"""The paper's anchor nets, each cut into L branching blocks: DeepLabv3+ on MobileNetV2 (PASCAL-Context),
DeepLabv3+ on ResNet-34 (NYU-v2) and the cifar10-fast ResNet-9 (CIFAR-100).

The encoders are torchvision's MobileNetV2 / ResNet-34 modules (made with ``weights=None``, never downloaded),
changed to output stride 16 the way DeepLab does it: the last stride-2 block keeps dilation 1 but loses its
stride, every 3x3 conv after it uses dilation 2. ``pretrained`` loads a local torchvision state dict into the
encoder blocks of every stream; ASPP, decoders and heads start random.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path as FilePath

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from dymu.backbones.base import Backbone, Path
from dymu.tasks import Task

KeyMap = Sequence[tuple[str, str]]
"""``(block prefix, source prefix)`` pairs: a block key starting with the first is the source key with the
second prefix instead (the first pair that matches wins; ``""`` matches every key)."""


def conv_bn_act(c_in: int, c_out: int, kernel_size: int = 1, activation: type[nn.Module] = nn.ReLU,
                dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                  groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        activation(inplace=True),
    )


def init_weights(module: nn.Module) -> None:
    """The initialisation torchvision uses for its encoders, applied to the new ASPP and decoder layers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``project(cat[1x1(x), atrous_r(x) for r in rates, pool(x)])``.

    Every branch is conv-BN-activation with ``out_channels``; the image-pooling branch is global average
    pooling, a 1x1 conv-BN-activation and a broadcast back to the feature size; the projection is a 1x1
    conv-BN-activation from ``(2 + len(rates)) * out_channels`` to ``out_channels``, then dropout. With
    ``rates=()`` this is the MobileNetV2 paper's reduced ASPP (R-ASPP). The pooling branch's BatchNorm sees one
    value per channel and image, so training mode needs batches of at least two images (as in DeepLab).
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18),
                 activation: type[nn.Module] = nn.ReLU, dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_act(in_channels, out_channels, 1, activation)])
        self.branches.extend(conv_bn_act(in_channels, out_channels, 3, activation, dilation=r) for r in rates)
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_act(in_channels, out_channels, 1, activation))
        self.project = nn.Sequential(conv_bn_act((len(rates) + 2) * out_channels, out_channels, 1, activation),
                                     nn.Dropout(dropout))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pooling(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """The DeepLabv3+ decoder as a head on a task's path.

    ``path[-1]`` (the ASPP output) is upsampled bilinearly to the low-level feature ``path[1 + low_index]``,
    concatenated with that feature projected to 48 channels (1x1 conv-BN-activation), fused by two 3x3
    conv-BN-activation layers of ``width`` channels (depthwise-separable ones if ``separable``, each a
    depthwise 3x3 conv-BN-act then a 1x1 conv-BN-act), classified by a 1x1 conv with bias and upsampled
    bilinearly to the input's size.
    """

    def __init__(self, deep_channels: int, low_channels: int, low_index: int, width: int, out_channels: int,
                 separable: bool = False, activation: type[nn.Module] = nn.ReLU, low_projected: int = 48) -> None:
        super().__init__()
        self.low_index = low_index
        self.project_low = conv_bn_act(low_channels, low_projected, 1, activation)
        fused = deep_channels + low_projected
        if separable:
            self.fuse = nn.Sequential(
                conv_bn_act(fused, fused, 3, activation, groups=fused), conv_bn_act(fused, width, 1, activation),
                conv_bn_act(width, width, 3, activation, groups=width), conv_bn_act(width, width, 1, activation),
            )
        else:
            self.fuse = nn.Sequential(conv_bn_act(fused, width, 3, activation), conv_bn_act(width, width, 3, activation))
        self.classifier = nn.Conv2d(width, out_channels, 1)
        init_weights(self)

    def forward(self, path: Path) -> Tensor:
        image, low, deep = path[0], path[1 + self.low_index], path[-1]
        deep = F.interpolate(deep, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.fuse(torch.cat([deep, self.project_low(low)], dim=1)))
        return F.interpolate(y, size=image.shape[-2:], mode="bilinear", align_corners=False)


def read_state_dict(path: str, expected: str) -> dict[str, Tensor]:
    """A state dict from ``path`` (a plain one or a checkpoint dict with a ``"state_dict"`` entry)."""
    if not FilePath(path).is_file():
        raise FileNotFoundError(f"pretrained weights file {path!r} does not exist; expected a local file holding "
                                f"{expected}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path!r} does not hold a state dict (name -> tensor); expected {expected}")
    return dict(loaded)


def _translate(key: str, key_map: KeyMap) -> str:
    for block_prefix, source_prefix in key_map:
        if key.startswith(block_prefix):
            return source_prefix + key[len(block_prefix):]
    raise KeyError(f"no source prefix for block key {key!r}")


def _listed(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_blocks(blocks: Sequence[nn.Module], key_maps: Sequence[KeyMap], path: str, expected: str,
                ignored: Sequence[str] = ()) -> None:
    """Copy the weights in ``path`` into ``blocks`` (block ``i``'s keys translated by ``key_maps[i]``).

    Source keys starting with an entry of ``ignored`` are skipped. ``num_batches_tracked`` buffers may be
    absent (torchvision's older ImageNet files have none).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: keys are missing or unexpected, or shapes differ.
    """
    source = read_state_dict(path, expected)
    used: set[str] = set()
    missing, mismatched = [], []
    per_block: list[dict[str, Tensor]] = []
    for block, key_map in zip(blocks, key_maps):
        values = {}
        for key, tensor in block.state_dict().items():
            name = _translate(key, key_map)
            used.add(name)
            if name not in source:
                if not key.endswith("num_batches_tracked"):
                    missing.append(name)
            elif source[name].shape != tensor.shape:
                mismatched.append(f"{name} (file {tuple(source[name].shape)}, model {tuple(tensor.shape)})")
            else:
                values[key] = source[name]
        per_block.append(values)
    unexpected = [k for k in source if k not in used and not k.startswith(tuple(ignored))]
    if missing or unexpected or mismatched:
        problems = [f"{what}: {_listed(keys)}" for what, keys in
                    [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)]
                    if keys]
        raise ValueError(f"{path!r} does not match; expected {expected}. " + "; ".join(problems))
    for block, values in zip(blocks, per_block):
        block.load_state_dict(values, strict=False)


def _dilate(conv: nn.Conv2d, dilation: int) -> None:
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (conv.kernel_size[0] // 2), dilation * (conv.kernel_size[1] // 2))


class DeepLabMobileNetV2(Backbone):
    """DeepLabv3+ on MobileNetV2 at output stride 16 with R-ASPP, as in BMTAS (PASCAL-Context anchor).

    Blocks (L = 18), the search space of BMTAS, whose 18 branching layers are the 17 inverted residual blocks
    and the R-ASPP (its stem conv is always shared; here each stream owns it, folded into block 0, because the
    layer-0 nodes must take the image):

    ===========  ===========================================  ========  ======
    block        torchvision module                           channels  stride
    ===========  ===========================================  ========  ======
    0            ``features[0]`` (stem) + ``features[1]``        16        2
    1, 2         ``features[2..3]``                             24        4
    3..5         ``features[4..6]``                             32        8
    6..9         ``features[7..10]``                            64        16
    10..12       ``features[11..13]``                           96        16
    13..15       ``features[14..16]`` (dilated)                160        16
    16           ``features[17]`` (dilated)                    320        16
    17           R-ASPP                                        128        16
    ===========  ===========================================  ========  ======

    ``features[14]`` loses its stride (dilation 1); the depthwise convs of ``features[15..17]`` use dilation 2.
    ``features[18]`` (1x1 conv to 1280) and the classifier are not used. R-ASPP:
    ``project(cat[b1(x), broadcast(b2(avgpool(x)))])`` with ``b1, b2`` 1x1 conv(320 -> 128)-BN-ReLU6 and
    ``project`` 1x1 conv(256 -> 128)-BN-ReLU6 then dropout. Head: the DeepLabv3+ decoder on block 2's output
    (24 channels, stride 4, projected to 48) with two depthwise-separable 3x3 fusions of 128 channels, as
    BMTAS does; ReLU6 throughout, as in MobileNetV2.

    Args:
        in_channels: image channels.
        pretrained: local path to a ``torchvision.models.mobilenet_v2()`` state dict loaded into blocks 0..16.
        aspp_channels: R-ASPP and decoder width.
        dropout: after the R-ASPP projection.
    """

    low_level_block = 2

    def __init__(self, in_channels: int = 3, pretrained: str | None = None, aspp_channels: int = 128,
                 dropout: float = 0.1) -> None:
        self.in_channels, self.pretrained = in_channels, pretrained
        self.aspp_channels, self.dropout = aspp_channels, dropout
        self.init_args = {"in_channels": in_channels, "pretrained": pretrained, "aspp_channels": aspp_channels,
                          "dropout": dropout}

    @property
    def num_blocks(self) -> int:
        return 18

    def make_encoder(self) -> list[nn.Module]:
        """Blocks 0..16 (random, or ``pretrained``)."""
        features = torchvision.models.mobilenet_v2(weights=None).features
        if self.in_channels != 3:
            features[0][0] = nn.Conv2d(self.in_channels, 32, 3, stride=2, padding=1, bias=False)
            nn.init.kaiming_normal_(features[0][0].weight, mode="fan_out")
        features[14].conv[1][0].stride = (1, 1)
        for i in (15, 16, 17):
            _dilate(features[i].conv[1][0], 2)
        blocks: list[nn.Module] = [nn.Sequential(features[0], features[1]), *features[2:18]]
        if self.pretrained is not None:
            key_maps = [[("0.", "features.0."), ("1.", "features.1.")]]
            key_maps += [[("", f"features.{i}.")] for i in range(2, 18)]
            load_blocks(blocks, key_maps, self.pretrained, "the state dict of torchvision.models.mobilenet_v2()",
                        ignored=("features.18.", "classifier."))
        return blocks

    def make_blocks(self) -> list[nn.Module]:
        return [*self.make_encoder(), ASPP(320, self.aspp_channels, (), nn.ReLU6, self.dropout)]

    def make_head(self, task: Task) -> nn.Module:
        return DeepLabV3PlusDecoder(self.aspp_channels, 24, self.low_level_block, self.aspp_channels,
                                    task.out_channels, separable=True, activation=nn.ReLU6)


class DeepLabResNet34(Backbone):
    """DeepLabv3+ on ResNet-34 at output stride 16 (NYU-v2 anchor).

    Blocks (L = 17): one per basic block, the granularity BMTAS uses for MobileNetV2, with the stem folded into
    block 0 (the layer-0 nodes take the image), and the ASPP as the last block (as BMTAS branches its R-ASPP;
    at about 4M parameters it is a fifth of a stream, too large to leave out of the search):

    ===========  ==========================================  ========  ======
    block        torchvision module                          channels  stride
    ===========  ==========================================  ========  ======
    0            stem (conv1, bn1, relu, maxpool) + layer1[0]     64        4
    1, 2         layer1[1..2]                                    64        4
    3..6         layer2[0..3]                                   128        8
    7..12        layer3[0..5]                                   256       16
    13..15       layer4[0..2] (dilated)                         512       16
    16           ASPP                                           256       16
    ===========  ==========================================  ========  ======

    ``layer4[0]`` loses its stride (conv1 and downsample stride 1, dilation 1); the 3x3 convs of
    ``layer4[1..2]`` use dilation 2 (torchvision's ``replace_stride_with_dilation`` rule). ASPP: 1x1, three
    3x3 atrous (rates 6, 12, 18) and image pooling, 256 channels each, then a 1x1 projection 1280 -> 256 and
    dropout. Head: the DeepLabv3+ decoder on block 2's output (layer1, 64 channels, stride 4, projected to 48)
    with two 3x3 conv-BN-ReLU of 256 channels.

    DYMU's table 4 single-task size for NYU-v2 (64.47M for 3 streams) is matched by the MobileNetV2 head on
    ResNet-34 instead: ``aspp_channels=128, aspp_rates=(), separable_decoder=True`` (R-ASPP 512 -> 128 and the
    separable decoder, 64.49M for heads of 40, 3 and 1 channels); the defaults are the standard DeepLabv3+.

    Args:
        in_channels: image channels.
        pretrained: local path to a ``torchvision.models.resnet34()`` state dict loaded into blocks 0..15.
        aspp_channels: ASPP and decoder width.
        aspp_rates: atrous rates (``()``: R-ASPP, a 1x1 and an image-pooling branch).
        dropout: after the ASPP projection.
        separable_decoder: depthwise-separable 3x3 fusions in the decoder.
    """

    low_level_block = 2

    def __init__(self, in_channels: int = 3, pretrained: str | None = None, aspp_channels: int = 256,
                 aspp_rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1,
                 separable_decoder: bool = False) -> None:
        self.in_channels, self.pretrained = in_channels, pretrained
        self.aspp_channels, self.aspp_rates, self.dropout = aspp_channels, [int(r) for r in aspp_rates], dropout
        self.separable_decoder = separable_decoder
        self.init_args = {"in_channels": in_channels, "pretrained": pretrained, "aspp_channels": aspp_channels,
                          "aspp_rates": self.aspp_rates, "dropout": dropout, "separable_decoder": separable_decoder}

    @property
    def num_blocks(self) -> int:
        return 17

    def make_encoder(self) -> list[nn.Module]:
        """Blocks 0..15 (random, or ``pretrained``)."""
        net = torchvision.models.resnet34(weights=None)
        if self.in_channels != 3:
            net.conv1 = nn.Conv2d(self.in_channels, 64, 7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.layer4[0].conv1.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
        for block in net.layer4[1:]:
            _dilate(block.conv1, 2)
            _dilate(block.conv2, 2)
        stem = nn.Sequential()
        for name in ("conv1", "bn1", "relu", "maxpool"):
            stem.add_module(name, getattr(net, name))
        stem.add_module("block", net.layer1[0])
        blocks: list[nn.Module] = [stem]
        key_maps: list[KeyMap] = [[("block.", "layer1.0."), ("", "")]]
        for s, layer in enumerate([net.layer1, net.layer2, net.layer3, net.layer4], start=1):
            for i, block in enumerate(layer):
                if (s, i) != (1, 0):
                    blocks.append(block)
                    key_maps.append([("", f"layer{s}.{i}.")])
        if self.pretrained is not None:
            load_blocks(blocks, key_maps, self.pretrained, "the state dict of torchvision.models.resnet34()",
                        ignored=("fc.",))
        return blocks

    def make_blocks(self) -> list[nn.Module]:
        return [*self.make_encoder(), ASPP(512, self.aspp_channels, self.aspp_rates, nn.ReLU, self.dropout)]

    def make_head(self, task: Task) -> nn.Module:
        return DeepLabV3PlusDecoder(self.aspp_channels, 64, self.low_level_block, self.aspp_channels,
                                    task.out_channels, separable=self.separable_decoder)


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class PooledLinearHead(nn.Module):
    """Global max-pooling of the deepest feature of the path, then a linear layer."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, path: Path) -> Tensor:
        return self.linear(torch.flatten(F.adaptive_max_pool2d(path[-1], 1), 1))


class ResNet9(Backbone):
    """The cifar10-fast ResNet-9 (CIFAR-100 anchor), L = 4 blocks:

    ===========  =================================================================  ========  ======
    block        layers (conv = 3x3 conv-BN-ReLU, no conv bias)                     channels  stride
    ===========  =================================================================  ========  ======
    0 prep       conv                                                               64w       1
    1 layer1     conv, max-pool 2, ``x + conv(conv(x))``                            128w      2
    2 layer2     conv, max-pool 2                                                   256w      4
    3 layer3     conv, max-pool 2, ``x + conv(conv(x))``                            512w      8
    ===========  =================================================================  ========  ======

    Head per task: global max-pooling then a linear layer (cifar10-fast's fixed 0.125 logit scale is left out).

    ``width`` multiplies every channel count (rounded). One stream with a 5-way head has
    ``sum_layers (9 c_in c_out + 2 c_out) + (512w + 1) 5`` parameters: 6.57M at width 1. DYMU's table 4
    single-task cost, 36.18M parameters for 20 streams, is 1.809M per stream; width 0.525 (34, 67, 134, 269
    channels, 1.814M) matches it best, width 0.5 gives 1.645M.

    Args:
        in_channels: image channels.
        width: channel multiplier.
        pretrained: local path to a state dict of these blocks (``nn.ModuleList(make_blocks()).state_dict()``).
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, pretrained: str | None = None) -> None:
        if not (math.isfinite(width) and width > 0):
            raise ValueError(f"width must be a positive number, got {width}")
        self.in_channels, self.width, self.pretrained = in_channels, float(width), pretrained
        self.channels = [max(1, round(c * self.width)) for c in (64, 128, 256, 512)]
        self.init_args = {"in_channels": in_channels, "width": self.width, "pretrained": pretrained}

    @property
    def num_blocks(self) -> int:
        return 4

    def make_blocks(self) -> list[nn.Module]:
        c0, c1, c2, c3 = self.channels

        def residual(c: int) -> Residual:
            return Residual(nn.Sequential(conv_bn_act(c, c, 3), conv_bn_act(c, c, 3)))

        blocks: list[nn.Module] = [
            conv_bn_act(self.in_channels, c0, 3),
            nn.Sequential(conv_bn_act(c0, c1, 3), nn.MaxPool2d(2), residual(c1)),
            nn.Sequential(conv_bn_act(c1, c2, 3), nn.MaxPool2d(2)),
            nn.Sequential(conv_bn_act(c2, c3, 3), nn.MaxPool2d(2), residual(c3)),
        ]
        if self.pretrained is not None:
            load_blocks(blocks, [[("", f"{i}.")] for i in range(len(blocks))], self.pretrained,
                        f"the state dict of nn.ModuleList(ResNet9(in_channels={self.in_channels}, "
                        f"width={self.width}).make_blocks())")
        return blocks

    def make_head(self, task: Task) -> nn.Module:
        return PooledLinearHead(self.channels[-1], task.out_channels)
