"""The declared stage table: every step of a run, its parents and what it writes.

A *training* stage is one LightningModule trained by its own LightningCLI (``dymu <stage> fit``), run by the
runner in a subprocess; a *computed* step is a function of its parents' artefacts (the affinity). The runner,
``dymu configs``, ``dymu info`` and the CLI's stage subcommands all read this table: adding a stage (a
baseline) is one entry here and one LightningModule.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.layout import RunLayout


@dataclass(frozen=True)
class Stage:
    """One step of a run.

    Attributes:
        name: the stage's name: its section of the pipeline config, its folder in the run directory and
            (for a training stage) its ``dymu`` subcommand.
        summary: one line for ``dymu --help``.
        parents: stages whose artefacts it reads (they run first).
        module: ``"package.module:LightningModuleClass"`` of a training stage; None for a computed step.
        compute: ``"package.module:function"`` of a computed step, called as ``f(config, layout)``.
        inputs: model init arguments that point at parents' artefacts: ``{argument: (parent, layout -> path)}``
            (the parent names whose run directory holds the artefact: a sweep trial reads its parent run's).
        shared: top-level pipeline sections copied into the stage's ``model`` (e.g. the backbone).
        seeded: the stage's ``model.seed`` follows the run's ``seed_everything`` unless set in its section.
        link_input_shape: the LightningCLI links the data's input shape into the model.
    """

    name: str
    summary: str
    parents: tuple[str, ...] = ()
    module: str | None = None
    compute: str | None = None
    inputs: dict[str, tuple[str, Callable[[RunLayout], Path]]] = field(default_factory=dict)
    shared: tuple[str, ...] = ()
    seeded: bool = False
    link_input_shape: bool = False

    @property
    def trained(self) -> bool:
        return self.module is not None

    def artefacts(self, layout: RunLayout) -> list[Path]:
        """What the stage leaves in a run directory when finished."""
        if self.trained:
            return [layout.final(self.name)]
        if self.name == "affinity":
            return [layout.affinity]
        return []

    def finished(self, layout: RunLayout) -> bool:
        return all(p.is_file() for p in self.artefacts(layout))

    def model_class(self) -> type:
        if self.module is None:
            raise ValueError(f"stage {self.name!r} is not a training stage")
        return _load(self.module)

    def compute_function(self) -> Callable[[dict[str, Any], RunLayout], Any]:
        if self.compute is None:
            raise ValueError(f"stage {self.name!r} is not a computed step")
        return _load(self.compute)


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("anchor", "stage 1: train the N single-task streams",
          module="lightning_modules.anchor:AnchorPretraining", shared=("backbone",), link_input_shape=True),
    Stage("affinity", "the anchor's RSA task affinity (computed, no training)", parents=("anchor",),
          compute="stages.affinity:affinity_step"),
    Stage("edge", "stage 2: train the edge hypernet (preference -> tree)", parents=("anchor", "affinity"),
          module="lightning_modules.edge:EdgeHypernetSearch", seeded=True,
          inputs={"anchor_checkpoint": ("anchor", lambda lay: lay.final("anchor")),
                  "affinity": ("affinity", lambda lay: lay.affinity)}),
    Stage("weight", "stage 3: train the weight hypernet (preference -> BatchNorm shifts)", parents=("edge",),
          module="lightning_modules.weight:WeightHypernetAdaptation", seeded=True,
          inputs={"edge_checkpoint": ("edge", lambda lay: lay.final("edge"))}),
)}

PIPELINE_KEYS = ("run_dir", "seed_everything", "data", "backbone", "logger", "evaluate")
STAGE_SECTION_KEYS = ("trainer", "model", "checkpoint", "data")


def training_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.trained]


def order(targets: tuple[str, ...] | None = None) -> list[Stage]:
    """The stages needed for ``targets`` (all by default), parents first, in the table's order."""
    unknown = sorted(set(targets or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the stage table has {list(STAGES)}")
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for parent in STAGES[name].parents:
                visit(parent)

    for name in targets or tuple(STAGES):
        visit(name)
    return [s for s in STAGES.values() if s.name in needed]


def describe_table() -> str:
    """The stage table as Markdown (for ``dymu info --stages`` and the docs)."""
    lines = ["| stage | kind | parents | writes | what |", "| --- | --- | --- | --- | --- |"]
    layout = RunLayout("<run_dir>")
    for s in STAGES.values():
        kind = f"training (`{s.module}`)" if s.trained else "computed"
        writes = ", ".join(f"`{p.relative_to(layout.root)}`" for p in s.artefacts(layout))
        lines.append(f"| {s.name} | {kind} | {', '.join(s.parents) or '-'} | {writes} | {s.summary} |")
    return "\n".join(lines)
