"""A found tree retrained on its own: the architecture evaluation of DYMU's tables 5 and 7.

The paper takes one tree per method (ours at the uniform preference for c = 0 and c = 1, the tree Learning to Branch
found, the one BMTAS found) and trains it as an ordinary static multi-task network on the uniform preference's
objective, either from the anchor's weights (each used node ``(l, s)`` starts as stream ``s``'s block ``l`` of
the single-task networks, every head as its task's) or from scratch (the backbone's own initialisation: the
ImageNet weights for a pretrained backbone, the paper's dagger rows). ``RetrainedTreeNet`` is that network:
``AnchorNet.specialize(tree)``, the pruned module the controllable model exports, with trainable weights.

``tree_from_checkpoint`` reads the tree a stage checkpoint defines, so a retraining stage can be declared before
its parent has found the tree: a tree search's (``dymu.baselines.ltb.found_architecture``) or a controllable
model's tree for a preference (``DynamicMultiTaskModel.architecture``, the noise-free argmax).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dymu.anchor import AnchorNet, SpecializedNet
from dymu.backbones.base import Backbone, build_backbone
from dymu.baselines.base import BaselineModel
from dymu.baselines.ltb import ARCHITECTURE_KEY
from dymu.checkpoint import META_KEY, load_checkpoint
from dymu.preference import Preference
from dymu.search_space import Architecture, as_architecture
from dymu.tasks import Task, tasks_from_config


def tree_from_checkpoint(path: str | Path, preference: Sequence[float] | None = None, c: float | None = None
                         ) -> Architecture:
    """The tree a stage checkpoint defines.

    Args:
        path: a tree search's checkpoint (``ltb``, ``bmtas``, or a retrained tree), whose stored tree is returned,
            or a controllable model's (``edge``, ``weight``), whose maximum-likelihood tree for ``(r, c)`` is.
        preference: ``r`` for a controllable model; default: uniform. Refused for a search's checkpoint.
        c: the cost preference for a controllable model (required there). Refused for a search's checkpoint.

    Raises:
        ValueError: the checkpoint defines no tree (an anchor or another baseline), or a preference was given for
            a search's fixed tree, or ``c`` is missing for a controllable model.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt[META_KEY]
    if ARCHITECTURE_KEY in meta:
        if preference is not None or c is not None:
            raise ValueError(f"{path} holds the fixed tree of a search (stage {meta.get('stage')!r}); it takes no "
                             "preference or c")
        return as_architecture(meta[ARCHITECTURE_KEY])
    config = meta["model"]
    if config.get("baseline") is not None or config.get("edge") is None:
        raise ValueError(f"{path} (stage {meta.get('stage')!r}) defines no tree: give a tree search's checkpoint "
                         "(ltb, bmtas) or a controllable model's (edge, weight)")
    if c is None:
        raise ValueError(f"{path} is a controllable model: its tree depends on the cost preference c; give c in [0, 1]")
    from dymu.model import DynamicMultiTaskModel

    model = DynamicMultiTaskModel.from_checkpoint(path)
    r = list(preference) if preference is not None else list(Preference.uniform(model.n_tasks).r)
    return model.architecture(r, float(c))


class RetrainedTreeNet(BaselineModel):
    """A fixed tree of the anchor's search space as a static network: the used nodes and the N heads
    (``AnchorNet.specialize``), ordinary trainable weights, the backbone's initialisation unless ``load_anchor``.

    Args:
        backbone, tasks, input_shape: see ``BaselineModel``.
        architecture: the tree (``Architecture`` or its ``to_list`` form).
        source: where the tree came from (recorded in checkpoints, e.g. the parent checkpoint and the preference).
    """

    kind = "retrain"

    def __init__(self, backbone: Backbone, tasks: Sequence[Task], input_shape: Sequence[int] | None = None,
                 architecture: Architecture | Sequence[Sequence[int]] | None = None,
                 source: Mapping[str, Any] | None = None) -> None:
        super().__init__(backbone, tasks, input_shape)
        if architecture is None:
            raise ValueError("RetrainedTreeNet needs the tree to train (architecture=...)")
        anchor = AnchorNet(backbone, tasks)
        self.tree = anchor.check_architecture(architecture)
        self.source = dict(source) if source is not None else None
        self.net: SpecializedNet = anchor.specialize(self.tree)

    def size_args(self) -> dict[str, Any]:
        return {"architecture": self.tree.to_list(), "source": self.source}

    def architecture(self) -> Architecture:
        """The tree this network computes."""
        return self.tree

    def load_anchor(self, state: Mapping[str, Tensor]) -> None:
        """Start from an anchor's weights (``state``: an ``AnchorNet`` state dict): every used node ``(l, s)`` gets
        stream ``s``'s block ``l``, every head its task's (the anchor specialised to the tree)."""
        anchor = AnchorNet(build_backbone(self.backbone_config), tasks_from_config(self.task_configs))
        anchor.load_state_dict(state)
        self.net.load_state_dict(anchor.specialize(self.tree).state_dict())

    def forward(self, x: Tensor, r: Any = None, c: Any = None) -> dict[str, Tensor]:
        """Task outputs of the tree; ``r`` and ``c`` are ignored (one fixed network)."""
        return self.net(x)

    def inference_network(self) -> nn.Module:
        return self.net
