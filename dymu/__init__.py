"""DYMU: Controllable Dynamic Multi-Task Architectures, in plain PyTorch.

The user-facing entry point is ``DynamicMultiTaskModel.from_run(run_dir)``.

The names below are imported on first use (PEP 562), so that ``import dymu.layout`` (the run layout, which the
``dymu`` commands read before anything trains) does not import torch: ``dymu <command> --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"AnchorNet": "dymu.anchor", "SpecializedNet": "dymu.anchor", "EdgeHypernet": "dymu.hypernets",
            "WeightHypernet": "dymu.hypernets", "DynamicMultiTaskModel": "dymu.model",
            "Preference": "dymu.preference", "Architecture": "dymu.search_space"}

__all__ = ["AnchorNet", "Architecture", "DynamicMultiTaskModel", "EdgeHypernet", "Preference", "SpecializedNet",
           "WeightHypernet"]

if TYPE_CHECKING:
    from dymu.anchor import AnchorNet, SpecializedNet
    from dymu.hypernets import EdgeHypernet, WeightHypernet
    from dymu.model import DynamicMultiTaskModel
    from dymu.preference import Preference
    from dymu.search_space import Architecture


def __getattr__(name: str) -> Any:
    """``dymu.DynamicMultiTaskModel`` and the other exported names, and ``dymu.<submodule>``, on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
