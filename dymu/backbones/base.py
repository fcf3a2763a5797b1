"""What a backbone must provide: one stream cut into L blocks, and a head per task.

A block takes the output of its parent node (the image for layer 0) and returns its own output.
A head takes the *path* of its task, ``[x, y_0, ..., y_{L-1}]`` (the input and the outputs of the nodes
on the task's branch, bottom up), so decoders that use low-level features (DeepLabv3+) fit the same tree.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from dymu.tasks import Task

Path = list[Tensor]


class Backbone(ABC):
    """A single-task network cut into ``num_blocks`` blocks, plus a head factory.

    Subclasses store their constructor arguments in ``self.init_args`` so that ``config()`` can rebuild
    them (checkpoints record it, and a stage refuses a checkpoint whose backbone differs).
    """

    init_args: dict[str, Any]

    @property
    @abstractmethod
    def num_blocks(self) -> int:
        """L, the number of branching blocks."""

    @abstractmethod
    def make_blocks(self) -> list[nn.Module]:
        """Fresh weights for one stream's L blocks."""

    @abstractmethod
    def make_head(self, task: Task) -> nn.Module:
        """A head for ``task``: ``head(path) -> prediction``."""

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``, the form jsonargparse and ``build_backbone`` read."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self.init_args)}


def build_backbone(config: dict[str, Any]) -> Backbone:
    """Rebuild a backbone from ``Backbone.config()`` output (only subclasses of ``Backbone`` are accepted)."""
    module_name, _, class_name = str(config["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise ValueError(f"{config['class_path']} is not a dymu Backbone")
    return cls(**config.get("init_args", {}))
