"""The DYMU paper's size figures for its four settings (tables 1-4), for setting ours beside them.

Transcribed from the DYMU paper's tables 1-4: the "Single-Task" row's inference parameters and
"GFLOPs" (the anchor: N separate streams) and the control parameters of "Ours w/o adaptation" (the edge
hypernet alone) and "Ours" (edge and weight hypernets), and the rows of the dynamic baselines PHN and PHN-BN
(inference parameters and "GFLOPs" of the shared network they run, their control parameters). The paper's
"GFLOPs" are multiply-adds: at
PASCAL-Context our multiply-adds are 2 % below them, our FLOPs (2 per multiply-add) twice them
(docs/datasets.md).

A setting is found by the data module's class path and its task names (order does not matter); a setting
whose data module has a single task list (CIFAR-100's 20 superclasses) matches any task list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BaselineFigures:
    """One baseline's row of DYMU tables 1-4, as printed.

    Attributes:
        inference_params: "inference params" (the network that runs).
        gflops: "GFLOPs" (multiply-adds, 1e9).
        control_params: "control params" (the hypernet).
    """

    inference_params: float
    gflops: float
    control_params: float


@dataclass(frozen=True)
class PaperSetting:
    """One setting of DYMU tables 1-4, its figures as printed (parameters in units, GFLOPs in 1e9).

    Attributes:
        name: the setting, as the paper's table caption names it.
        table: where the figures are, e.g. ``"DYMU table 1"``.
        data: class path of our data module for it.
        tasks: its task names; None where the data module has one fixed task list.
        anchor_params: "Single-Task" inference parameters.
        anchor_gflops: "Single-Task" GFLOPs (multiply-adds).
        edge_params: control parameters of "Ours w/o adaptation" (the edge hypernet).
        control_params: control parameters of "Ours" (edge and weight hypernets).
        baselines: the baselines' rows, keyed by the stage that trains them (``phn``, ``phn_bn``).
    """

    name: str
    table: str
    data: str
    tasks: tuple[str, ...] | None
    anchor_params: float
    anchor_gflops: float
    edge_params: float
    control_params: float
    baselines: Mapping[str, BaselineFigures] = field(default_factory=dict)

    @property
    def weight_params(self) -> float:
        """The weight hypernet's parameters: control parameters of "Ours" less those of "w/o adaptation"."""
        return self.control_params - self.edge_params

    def matches(self, data: str, tasks: Sequence[str]) -> bool:
        return data == self.data and (self.tasks is None or sorted(tasks) == sorted(self.tasks))


PASCAL_CONTEXT = "datamodules.pascal_context.PascalContext"

PAPER_SETTINGS: dict[str, PaperSetting] = {s.name: s for s in (
    PaperSetting("PASCAL-Context 5 tasks", "DYMU table 1", PASCAL_CONTEXT,
                 ("semseg", "parts", "saliency", "normals", "edges"),
                 anchor_params=9.84e6, anchor_gflops=16.17, edge_params=0.06e6, control_params=15.32e6,
                 baselines={"phn": BaselineFigures(2.15e6, 6.28, 21.50e6),
                            "phn_bn": BaselineFigures(2.15e6, 6.28, 3.63e6)}),
    PaperSetting("PASCAL-Context 3 tasks", "DYMU table 2", PASCAL_CONTEXT, ("semseg", "parts", "saliency"),
                 anchor_params=5.91e6, anchor_gflops=9.75, edge_params=0.03e6, control_params=9.25e6,
                 baselines={"phn": BaselineFigures(2.06e6, 4.81, 21.10e6),
                            "phn_bn": BaselineFigures(2.06e6, 4.81, 3.32e6)}),
    PaperSetting("NYU-v2", "DYMU table 3", "datamodules.nyuv2.NYUv2", ("semseg", "normals", "depth"),
                 anchor_params=64.47e6, anchor_gflops=58.78, edge_params=0.03e6, control_params=5.72e6,
                 baselines={"phn": BaselineFigures(21.59e6, 21.02, 21.04e6),
                            "phn_bn": BaselineFigures(21.59e6, 21.02, 2.23e6)}),
    PaperSetting("CIFAR-100", "DYMU table 4", "datamodules.cifar100.CIFAR100MultiTask", None,
                 anchor_params=36.18e6, anchor_gflops=348.79, edge_params=0.34e6, control_params=3.10e6,
                 baselines={"phn": BaselineFigures(16.35e6, 73.13, 11.03e6),
                            "phn_bn": BaselineFigures(16.35e6, 73.13, 0.31e6)}),
)}
"""DYMU tables 1-4, keyed by setting name."""


def paper_setting(data: str, tasks: Sequence[str]) -> PaperSetting | None:
    """The paper's setting for the data module with class path ``data`` and these tasks; None if it has none."""
    found = [s for s in PAPER_SETTINGS.values() if s.matches(data, tasks)]
    return found[0] if found else None
