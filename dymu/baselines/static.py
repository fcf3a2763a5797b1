"""Static multi-task networks: the shared network trained for one fixed preference ``r`` with the
scalarised loss ``sum_t r_t w_t L_t`` (DYMU section 4's "Multi-task networks", one per preference, so their
training time grows with the number of preferences). Trained at the uniform preference it is also the frozen
network under PHN-BN."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from dymu.backbones.base import Backbone
from dymu.baselines.base import BaselineModel, shared_network
from dymu.preference import Preference
from dymu.tasks import Task


class StaticMultiTaskNet(BaselineModel):
    """The shared network (one stream's blocks, N heads) with ordinary trainable weights.

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
        preference: the task preference it is trained for (``None``: uniform); recorded, and the one
            preference its stage trains and validates with. ``forward`` ignores the preference it is given.
    """

    kind = "static"

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None,
                 preference: Sequence[float] | None = None) -> None:
        super().__init__(backbone, tasks, input_shape)
        n = len(tasks)
        self.trained_preference = (Preference.uniform(n) if preference is None
                                   else Preference.create(list(preference), 0.0, n_tasks=n))
        self.net = shared_network(backbone, tasks)

    def size_args(self) -> dict[str, Any]:
        return {"preference": list(self.trained_preference.r)}

    def forward(self, x: Tensor, r: Any = None, c: Any = None) -> dict[str, Tensor]:
        """Task outputs; ``r`` and ``c`` are ignored (the network is the same for every preference)."""
        return self.net(x)

    def inference_network(self) -> nn.Module:
        return self.net
