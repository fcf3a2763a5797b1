"""PHN-BN (DYMU section 4): the shared network trained as an ordinary multi-task network at the uniform
preference, then frozen, while a hypernet of the weight hypernet's shape (``dymu.hypernets.WeightHypernet``)
predicts shifts ``(delta_gamma, delta_beta)`` of its BatchNorms from the task preference ``r``. The shifted
BatchNorm is DYMU's own (``dymu.anchor.modulated_bn_parameters`` through ``functional_call``).

Which BatchNorms: those of the blocks and, with ``modulate_heads`` (the default), those of the heads'
decoders too, i.e. every BatchNorm of the network. The paper does not say; its PHN-BN control parameter counts (tables 1-4:
3.63M / 3.32M / 2.23M / 0.31M) lie near both readings with this project's paper backbones (with the heads /
blocks only: PASCAL-Context 5 tasks 3.90M / 3.29M, 3 tasks 3.66M / 3.29M, NYU-v2 2.19M / 1.82M, CIFAR-100
0.26M, whose linear heads have no BatchNorm).

Statistics: ``bn_statistics="running"`` (the default, as the weight hypernet's) normalises with the frozen
network's running statistics; ``"batch"`` with the statistics of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from dymu.anchor import BNDeltas, modulated_bn_parameters, use_batch_statistics
from dymu.backbones.base import Backbone
from dymu.baselines.base import (
    BN_STATISTIC_BUFFERS,
    BaselineModel,
    all_batchnorms,
    check_bn_statistics,
    shared_network,
)
from dymu.hypernets import WeightHypernet
from dymu.preference import Preference
from dymu.tasks import Task


class PhnBnNet(BaselineModel):
    """The frozen shared network ``net`` and the BatchNorm hypernet ``hypernet``.

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
        embed_dim, hidden: the hypernet's sizes (the weight hypernet's 32 and 100).
        bn_statistics: ``"running"`` or ``"batch"`` (module docstring).
        modulate_heads: shift the heads' BatchNorms too, not only the blocks'.
    """

    kind = "phn_bn"

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None,
                 embed_dim: int = 32, hidden: int = 100, bn_statistics: str = "running",
                 modulate_heads: bool = True) -> None:
        super().__init__(backbone, tasks, input_shape)
        check_bn_statistics(bn_statistics)
        self.modulate_heads = bool(modulate_heads)
        self.net = shared_network(backbone, tasks)
        if bn_statistics == "batch":
            use_batch_statistics(self.net)
        self.net.requires_grad_(False)
        batchnorms = all_batchnorms(self.net, heads=self.modulate_heads)
        if not batchnorms:
            raise ValueError(f"PHN-BN needs BatchNorms to modulate; backbone {self.backbone_config['class_path']} "
                             "has none")
        self.hypernet = WeightHypernet(len(tasks), batchnorms, embed_dim=embed_dim, hidden=hidden,
                                       bn_statistics=bn_statistics)

    def size_args(self) -> dict[str, Any]:
        return {**self.hypernet.size_args, "modulate_heads": self.modulate_heads}

    def load_frozen(self, state: Mapping[str, Tensor]) -> None:
        """Load the shared network's weights (a static network's ``net``); the running statistics are dropped
        when this model normalises with batch statistics."""
        own = self.net.state_dict()
        kept = {k: v for k, v in state.items() if k in own or k.rpartition(".")[2] not in BN_STATISTIC_BUFFERS}
        self.net.load_state_dict(kept)

    def train(self, mode: bool = True) -> PhnBnNet:
        super().train(mode)
        self.net.eval()  # frozen: its running statistics are used, never updated
        return self

    def bn_deltas(self, r: Sequence[float] | Tensor | Preference) -> BNDeltas:
        """``{bn_name: (delta_gamma, delta_beta)}`` for preference ``r``."""
        r_tensor = self.preference_r(r, device=next(self.hypernet.parameters()).device)
        return self.hypernet(r_tensor, r_tensor.new_zeros(()))

    def effective_parameters(self, r: Sequence[float] | Tensor | Preference) -> dict[str, Tensor]:
        """Every parameter of the network that runs for ``r``: the frozen ones, BatchNorm affines shifted."""
        return {**dict(self.net.named_parameters()), **modulated_bn_parameters(self.net, self.bn_deltas(r))}

    def forward(self, x: Tensor, r: Sequence[float] | Tensor | Preference, c: Any = None) -> dict[str, Tensor]:
        """Task outputs of the frozen network with BatchNorms shifted for ``r`` (``c`` is ignored)."""
        return functional_call(self.net, modulated_bn_parameters(self.net, self.bn_deltas(r)), (x,))

    def inference_network(self) -> nn.Module:
        return self.net  # the shifts change values, not the parameter count or the FLOPs

    def control_parameters(self) -> int:
        return sum(p.numel() for p in self.hypernet.parameters())
