"""Backbones for CPU-scale work: a small conv encoder with a light dense decoder, and an MLP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.backbones.base import Backbone, Path
from dymu.tasks import Task


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU layers; the first may downsample."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(c_in, c_out, stride), conv_bn_relu(c_out, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class DenseDecoderHead(nn.Module):
    """A light DeepLabv3+-style decoder: project the deepest feature and one low-level feature, fuse, and
    upsample to the input's size."""

    def __init__(self, deep_channels: int, low_channels: int, low_index: int, width: int,
                 out_channels: int) -> None:
        super().__init__()
        self.low_index = low_index
        self.project_low = nn.Sequential(nn.Conv2d(low_channels, width // 2, 1, bias=False),
                                         nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True))
        self.project_deep = nn.Sequential(nn.Conv2d(deep_channels, width, 1, bias=False),
                                          nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.fuse = conv_bn_relu(width + width // 2, width)
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, path: Path) -> Tensor:
        image, low, deep = path[0], path[1 + self.low_index], path[-1]
        deep = F.interpolate(self.project_deep(deep), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.fuse(torch.cat([deep, self.project_low(low)], dim=1)))
        return F.interpolate(y, size=image.shape[-2:], mode="bilinear", align_corners=False)


class ConvEncoderDecoder(Backbone):
    """A small conv encoder cut into one block per entry of ``channels``, with a dense decoder head.

    Args:
        channels: output channels of each block (L = len(channels)).
        strides: stride of each block's first conv.
        in_channels: image channels.
        decoder_width: channels in the decoder head.
        low_level_block: which block's output the decoder uses as its low-level feature.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 48, 64), strides: Sequence[int] = (1, 2, 2, 1),
                 in_channels: int = 3, decoder_width: int = 32, low_level_block: int = 1) -> None:
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {list(channels)} and strides {list(strides)} must be non-empty and "
                             "of equal length (one entry per block)")
        if not 0 <= low_level_block < len(channels):
            raise ValueError(f"low_level_block {low_level_block} outside 0..{len(channels) - 1}")
        self.channels, self.strides = [int(c) for c in channels], [int(s) for s in strides]
        self.in_channels, self.decoder_width, self.low_level_block = in_channels, decoder_width, low_level_block
        self.init_args = {"channels": self.channels, "strides": self.strides, "in_channels": in_channels,
                          "decoder_width": decoder_width, "low_level_block": low_level_block}

    @property
    def num_blocks(self) -> int:
        return len(self.channels)

    def make_blocks(self) -> list[nn.Module]:
        c_in = [self.in_channels, *self.channels[:-1]]
        return [ConvBlock(a, b, s) for a, b, s in zip(c_in, self.channels, self.strides)]

    def make_head(self, task: Task) -> nn.Module:
        return DenseDecoderHead(self.channels[-1], self.channels[self.low_level_block], self.low_level_block,
                                self.decoder_width, task.out_channels)


class LinearHead(nn.Module):
    """A linear layer on the deepest feature of the path."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, path: Path) -> Tensor:
        return self.linear(path[-1])


class BiasHead(nn.Module):
    """The deepest feature of the path plus a learned bias: Learning to Branch's "simple bias terms for
    task-specific layers" (its synthetic experiment), so tasks that share the last node share their outputs up to
    a constant."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, path: Path) -> Tensor:
        return path[-1] + self.bias


HEADS = ("linear", "bias")


class MLPBackbone(Backbone):
    """Fully connected blocks (Linear-BN-ReLU), as in Learning to Branch's synthetic experiment.

    Args:
        input_dim: input features.
        hidden: units per block.
        num_layers: L.
        head: ``"linear"`` (a linear layer per task) or ``"bias"`` (the paper's synthetic experiment: the last
            block's units are the outputs, without its ReLU, and each task adds a bias; needs ``hidden`` equal to
            the tasks' output size).
    """

    def __init__(self, input_dim: int = 64, hidden: int = 100, num_layers: int = 4,
                 head: Literal["linear", "bias"] = "linear") -> None:
        if min(input_dim, hidden, num_layers) < 1:
            raise ValueError(f"input_dim, hidden and num_layers must be >= 1, got {input_dim}, {hidden}, "
                             f"{num_layers}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
        self.input_dim, self.hidden, self.num_layers, self.head = input_dim, hidden, num_layers, head
        self.init_args = {"input_dim": input_dim, "hidden": hidden, "num_layers": num_layers}
        if head != "linear":  # configs written before the option keep their exact form
            self.init_args["head"] = head

    @property
    def num_blocks(self) -> int:
        return self.num_layers

    def make_blocks(self) -> list[nn.Module]:
        dims = [self.input_dim] + [self.hidden] * self.num_layers
        blocks = [nn.Sequential(nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True))
                  for a, b in zip(dims[:-1], dims[1:])]
        if self.head == "bias":
            blocks[-1] = blocks[-1][:2]  # the outputs themselves: no ReLU
        return blocks

    def make_head(self, task: Task) -> nn.Module:
        if self.head == "bias":
            if task.out_channels != self.hidden:
                raise ValueError(f"head='bias' makes the last block's {self.hidden} units task {task.name!r}'s "
                                 f"outputs, but it has {task.out_channels}: set hidden={task.out_channels}")
            return BiasHead(self.hidden)
        return LinearHead(self.hidden, task.out_channels)
