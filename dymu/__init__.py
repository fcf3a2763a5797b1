"""DYMU: Controllable Dynamic Multi-Task Architectures, in plain PyTorch.

The user-facing entry point is ``DynamicMultiTaskModel.from_run(run_dir)``.
"""

from dymu.anchor import AnchorNet, SpecializedNet
from dymu.hypernets import EdgeHypernet, WeightHypernet
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.search_space import Architecture

__all__ = ["AnchorNet", "Architecture", "DynamicMultiTaskModel", "EdgeHypernet", "Preference", "SpecializedNet",
           "WeightHypernet"]
