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
from typing import TYPE_CHECKING, Any, Literal, NotRequired

from jsonargparse.typing import PositiveInt
from typing_extensions import TypedDict

from dymu.layout import RunLayout

if TYPE_CHECKING:
    from stages.pipeline import PipelineConfig


class ClassSpec(TypedDict):
    """A class and its arguments, as LightningCLI writes them: ``{class_path: ..., init_args: {...}}``."""

    class_path: str
    init_args: NotRequired[dict]


@dataclass(frozen=True)
class StageSection:
    """A training stage's section of the pipeline config.

    Attributes:
        trainer: the stage's ``Trainer`` arguments (typed by its LightningCLI).
        model: its LightningModule's arguments, besides those the runner fills in (the backbone, the parents'
            checkpoints, the seed).
        checkpoint: ``StageCheckpoint``'s arguments (``every_n_train_steps``).
        data: the data module's init arguments that this stage overrides (e.g. its batch size).
    """

    # plain ``dict``: the parser checks the shape and leaves the values as written (a ``class_path`` inside is
    # resolved, with its class's defaults, by the stage's own LightningCLI, not here)
    trainer: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    checkpoint: dict | None = None
    data: dict = field(default_factory=dict)


STATIC_COUNT = 20
"""K, the static networks of the comparison: the protocol's evaluation preferences at c = 0."""


@dataclass(frozen=True)
class StaticSection(StageSection):
    """The static networks' section: ``count`` networks, one per evaluation preference."""

    count: PositiveInt = STATIC_COUNT


RETRAIN_TREES = ("ours_c0", "ours_c1", "ltb", "bmtas")
"""The trees of the architecture evaluation (DYMU's tables 5 and 7): ours at the uniform preference for c = 0 and
c = 1 (``ours_c<c>``, read from the edge stage), and the trees LTB and BMTAS found."""
RETRAIN_INITS = ("anchor", "scratch")
"""Each tree is retrained from the anchor's weights and from scratch (the paper's dagger rows)."""


@dataclass(frozen=True)
class RetrainSection(StageSection):
    """The architecture evaluation's section: each of ``trees`` retrained from each of ``inits``."""

    trees: list[str] = field(default_factory=lambda: list(RETRAIN_TREES))
    inits: list[Literal["anchor", "scratch"]] = field(default_factory=lambda: list(RETRAIN_INITS))


@dataclass(frozen=True)
class AffinitySection:
    """The affinity step's section: RSA over ``num_images`` test images drawn with ``seed``."""

    num_images: PositiveInt = 100
    seed: int = 0


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
        in_pipeline: part of ``dymu run`` by default (DYMU's own stages); the baselines run when asked for
            (``dymu run --stages phn``, ``dymu compare``).
        repeat: ``"package.module:function"`` giving, from the pipeline config, the instances of a stage trained
            several times (one folder each, e.g. ``static/p00``) and each one's model arguments.
        section: the dataclass of the stage's section of the pipeline config (``StageSection`` or a subclass).
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
    in_pipeline: bool = True
    repeat: str | None = None
    section: type[StageSection] = StageSection

    @property
    def trained(self) -> bool:
        return self.module is not None

    def instances(self, config: PipelineConfig | None = None) -> list[tuple[str, dict[str, Any]]]:
        """``(folder, model arguments)`` of each time the stage is trained: ``[(name, {})]`` unless repeated."""
        if self.repeat is None:
            return [(self.name, {})]
        if config is None:
            raise ValueError(f"the instances of stage {self.name!r} depend on the pipeline config")
        return _load(self.repeat)(config)

    def artefacts(self, layout: RunLayout, config: PipelineConfig | None = None) -> list[Path]:
        """What the stage leaves in a run directory when finished."""
        if self.trained:
            if self.repeat is not None and config is None:
                return [layout.final(f"{self.name}/<instance>")]
            return [layout.final(folder) for folder, _ in self.instances(config)]
        if self.name == "affinity":
            return [layout.affinity]
        return []

    def finished(self, layout: RunLayout, config: PipelineConfig | None = None) -> bool:
        """Whether the stage's artefacts are there (a computed step's: and made from its present parents)."""
        if not self.trained:
            from stages.lineage import computed_current

            return computed_current(layout, self)
        return all(p.is_file() for p in self.artefacts(layout, config))

    def model_class(self) -> type:
        if self.module is None:
            raise ValueError(f"stage {self.name!r} is not a training stage")
        return _load(self.module)

    def compute_function(self) -> Callable[[PipelineConfig, RunLayout], Any]:
        if self.compute is None:
            raise ValueError(f"stage {self.name!r} is not a computed step")
        return _load(self.compute)


def _anchor(layout: RunLayout) -> Path:
    return layout.final("anchor")


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("anchor", "stage 1: train the N single-task streams",
          module="lightning_modules.anchor:AnchorPretraining", shared=("backbone",), link_input_shape=True),
    Stage("affinity", "the anchor's RSA task affinity (computed, no training)", parents=("anchor",),
          compute="stages.affinity:affinity_step"),
    Stage("edge", "stage 2: the tree of each preference: the measured controller, or the Gumbel search of the edge "
          "hypernet", parents=("anchor", "affinity"),
          module="lightning_modules.edge:EdgeHypernetSearch", seeded=True,
          inputs={"anchor_checkpoint": ("anchor", lambda lay: lay.final("anchor")),
                  "affinity": ("affinity", lambda lay: lay.affinity)}),
    Stage("weight", "stage 3: train the weight hypernet (preference -> BatchNorm shifts)", parents=("edge",),
          module="lightning_modules.weight:WeightHypernetAdaptation", seeded=True,
          inputs={"edge_checkpoint": ("edge", lambda lay: lay.final("edge"))}),
    # the baselines of the paper's comparison (dymu compare)
    Stage("shared_mtl", "baseline: the shared multi-task network at the uniform preference (PHN-BN's parent)",
          parents=("anchor",), module="lightning_modules.shared_mtl:SharedMultiTaskTraining", shared=("backbone",),
          link_input_shape=True, in_pipeline=False, inputs={"anchor_checkpoint": ("anchor", _anchor)}),
    Stage("phn", "baseline: Pareto HyperNetwork (every weight generated from r)", parents=("anchor",),
          module="lightning_modules.phn:ParetoHypernetTraining", shared=("backbone",), seeded=True,
          link_input_shape=True, in_pipeline=False, inputs={"anchor_checkpoint": ("anchor", _anchor)}),
    Stage("phn_bn", "baseline: PHN-BN (BatchNorm shifts over the frozen shared network)",
          parents=("shared_mtl", "anchor"), module="lightning_modules.phn_bn:PhnBnTraining", seeded=True,
          in_pipeline=False, inputs={"shared_checkpoint": ("shared_mtl", lambda lay: lay.final("shared_mtl")),
                                     "anchor_checkpoint": ("anchor", _anchor)}),
    Stage("static", "baseline: K shared multi-task networks, one per evaluation preference", parents=("anchor",),
          module="lightning_modules.shared_mtl:SharedMultiTaskTraining", shared=("backbone",),
          link_input_shape=True, in_pipeline=False, repeat="stages.graph:static_instances", section=StaticSection,
          inputs={"anchor_checkpoint": ("anchor", _anchor)}),
    # the static architecture searches (the architecture evaluation of dymu compare)
    Stage("ltb", "baseline: Learning to Branch (a static tree, Gumbel-sampled branching from the anchor)",
          parents=("anchor",), module="lightning_modules.ltb:LearnToBranchSearch", shared=("backbone",),
          seeded=True, link_input_shape=True, in_pipeline=False, inputs={"anchor_checkpoint": ("anchor", _anchor)}),
    Stage("bmtas", "baseline: BMTAS (per-task routings, proxyless resource loss)", parents=("anchor",),
          module="lightning_modules.bmtas:BmtasSearch", shared=("backbone",), seeded=True, link_input_shape=True,
          in_pipeline=False, inputs={"anchor_checkpoint": ("anchor", _anchor)}),
    Stage("feature_partitioning", "baseline: feature partitioning (channel masks searched by distillation)",
          parents=("anchor",), module="lightning_modules.feature_partitioning:FeaturePartitionTraining",
          shared=("backbone",), seeded=True, link_input_shape=True, in_pipeline=False,
          inputs={"anchor_checkpoint": ("anchor", _anchor)}),
    # the architecture evaluation's retrained trees (dymu compare --architectures)
    Stage("retrain", "architecture evaluation: a found tree (ours at the uniform preference, LTB's, BMTAS's) "
          "retrained from the anchor's weights or from scratch", parents=("anchor", "edge", "ltb", "bmtas"),
          module="lightning_modules.retrain:TreeRetraining", shared=("backbone",), seeded=True, link_input_shape=True,
          in_pipeline=False, repeat="stages.graph:retrain_instances", section=RetrainSection,
          inputs={"anchor_checkpoint": ("anchor", _anchor), "edge_checkpoint": ("edge", lambda lay: lay.final("edge")),
                  "ltb_checkpoint": ("ltb", lambda lay: lay.final("ltb")),
                  "bmtas_checkpoint": ("bmtas", lambda lay: lay.final("bmtas"))}),
)}



def static_instances(config: PipelineConfig) -> list[tuple[str, dict[str, Any]]]:
    """One static network per evaluation preference of the protocol (``static.count`` of them, default K = 20,
    ``r ~ Dirichlet(1)`` with the evaluation's seed): folders ``static/p00``, ``static/p01``, ..."""
    from dymu.preference import evaluation_preferences
    from stages.common import build_data

    count = config.section("static").count
    n = len(build_data(config.data).tasks)
    seed = int(config.evaluate["seed"])
    prefs = evaluation_preferences(n, count, c=0.0, seed=seed)
    return [(f"static/p{k:02d}", {"preference": [float(v) for v in p.r]}) for k, p in enumerate(prefs)]



def retrain_instances(config: PipelineConfig) -> list[tuple[str, dict[str, Any]]]:
    """One retraining per tree of ``retrain.trees`` (default ``RETRAIN_TREES``) and init of ``retrain.inits``
    (default ``RETRAIN_INITS``): folders ``retrain/ours_c0_anchor``, ``retrain/ours_c0_scratch``, ...,
    ``retrain/bmtas_scratch``, each with its ``tree_from`` (the parent stage and, for ours, ``c``; the preference
    is the uniform one) and ``init``."""
    section = config.section("retrain")
    trees, inits = list(section.trees), list(section.inits)
    if not trees or not inits:
        raise ValueError(f"retrain.trees and retrain.inits must not be empty, got {trees} and {inits}")
    instances = []
    for tree in trees:
        if tree in ("ltb", "bmtas"):
            tree_from: dict[str, Any] = {"stage": tree}
        elif isinstance(tree, str) and tree.startswith("ours_c"):
            try:
                c = float(tree[len("ours_c"):])
            except ValueError:
                c = -1.0
            if not 0.0 <= c <= 1.0:
                raise ValueError(f"retrain.trees: {tree!r} must be ours_c<c> with c in [0, 1] (e.g. ours_c0, ours_c1)")
            tree_from = {"stage": "edge", "c": c}
        else:
            raise ValueError(f"retrain.trees: unknown tree {tree!r}; use ltb, bmtas or ours_c<c> (e.g. ours_c0)")
        instances += [(f"retrain/{tree}_{init}", {"tree_from": tree_from, "init": init}) for init in inits]
    return instances


def training_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.trained]


def order(targets: tuple[str, ...] | None = None) -> list[Stage]:
    """The stages needed for ``targets`` (by default the pipeline's: ``in_pipeline``), parents first, in the
    table's order."""
    unknown = sorted(set(targets or ()) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the stage table has {list(STAGES)}")
    needed: set[str] = set()

    def visit(name: str) -> None:
        if name not in needed:
            needed.add(name)
            for parent in STAGES[name].parents:
                visit(parent)

    for name in targets or tuple(n for n, s in STAGES.items() if s.in_pipeline):
        visit(name)
    return [s for s in STAGES.values() if s.name in needed]


def describe_table() -> str:
    """The stage table as Markdown (for ``dymu info --stages`` and the docs)."""
    lines = ["| stage | kind | parents | writes | in `dymu run` | what |", "| --- | --- | --- | --- | --- | --- |"]
    layout = RunLayout("<run_dir>")
    for s in STAGES.values():
        kind = f"training (`{s.module}`)" if s.trained else "computed"
        writes = ", ".join(f"`{p.relative_to(layout.root)}`" for p in s.artefacts(layout))
        lines.append(f"| {s.name} | {kind} | {', '.join(s.parents) or '-'} | {writes} | "
                     f"{'yes' if s.in_pipeline else 'when asked'} | {s.summary} |")
    return "\n".join(lines)
