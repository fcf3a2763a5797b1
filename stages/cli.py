"""The ``dymu`` command: one LightningCLI per stage, plus ``run``, ``evaluate`` and ``info``.

``dymu anchor|edge|weight fit|validate --config X.yaml`` trains or validates one stage;
``dymu run --config pipeline.yaml [--run_dir D]`` chains them; ``dymu evaluate --run_dir D`` writes the
report; ``dymu info --config pipeline.yaml`` prints sizes without data or training.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

FINAL_CHECKPOINT = "final.ckpt"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
DEFAULT_LOGGER = {"class_path": WANDB_LOGGER, "init_args": {"offline": True, "project": "dymu"}}


class StageCheckpoint(ModelCheckpoint):
    """Saves ``<default_root_dir>/checkpoints/last.ckpt`` every ``every_n_train_steps`` steps (to resume a
    killed run) and ``<default_root_dir>/final.ckpt`` when fit finishes (the next stage's input; the
    runner skips a stage that has one)."""

    def __init__(self, every_n_train_steps: int = 100) -> None:
        super().__init__(dirpath=None, filename="{step}", save_last=True, save_top_k=1,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.interrupted:
            # the full state (optimiser included), so a finished stage can also be trained further
            trainer.save_checkpoint(Path(trainer.default_root_dir) / FINAL_CHECKPOINT, weights_only=False)


def task_configs(tasks: list[Any]) -> list[dict[str, Any]]:
    return [t.to_config() for t in tasks]


class DymuCLI(LightningCLI):
    """Links the data module's tasks (and input shape, for the anchor) into the model, adds the stage
    checkpoint callback, and puts the logger's files (W&B offline runs, CSV) under the stage's directory."""

    def __init__(self, *args: Any, link_input_shape: bool = False, **kwargs: Any) -> None:
        self.link_input_shape = link_input_shape
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.tasks", "model.task_configs", compute_fn=task_configs, apply_on="instantiate")
        if self.link_input_shape:
            parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
        parser.add_lightning_class_args(StageCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and "save_dir" in init_args and init_args["save_dir"] in (None, ".", ""):
            init_args["save_dir"] = config.trainer.get("default_root_dir") or "."


def stage_main(model_class: type[LightningModule], args: list[str] | dict[str, Any] | None = None,
               link_input_shape: bool = False, run: bool = True) -> DymuCLI:
    """Run one stage's LightningCLI (tests call this directly)."""
    # sys.argv keeps the stage name so that DDP's launcher re-executes the same command; LightningCLI gets
    # the arguments after it and would otherwise warn that they differ from sys.argv.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return DymuCLI(model_class, LightningDataModule, subclass_mode_data=True, args=args, run=run,
                   link_input_shape=link_input_shape, save_config_kwargs={"overwrite": True},
                   trainer_defaults={"logger": DEFAULT_LOGGER})


def anchor_main(args: list[str] | None = None) -> DymuCLI:
    from lightning_modules.anchor import AnchorPretraining

    return stage_main(AnchorPretraining, args, link_input_shape=True)


def edge_main(args: list[str] | None = None) -> DymuCLI:
    from lightning_modules.edge import EdgeHypernetSearch

    return stage_main(EdgeHypernetSearch, args)


def weight_main(args: list[str] | None = None) -> DymuCLI:
    from lightning_modules.weight import WeightHypernetAdaptation

    return stage_main(WeightHypernetAdaptation, args)


STAGE_MAINS = {"anchor": anchor_main, "edge": edge_main, "weight": weight_main}

USAGE = """usage: dymu COMMAND [ARGS]

commands:
  anchor fit|validate --config X.yaml   stage 1: train the single-task streams (LightningCLI)
  edge   fit|validate --config X.yaml   stage 2: train the edge hypernet (LightningCLI)
  weight fit|validate --config X.yaml   stage 3: train the weight hypernet (LightningCLI)
  run --config P.yaml [--run_dir D]     all stages, then evaluate, in one run directory
      [--data_root R] [--set KEY=VALUE]   (R sets data.init_args.root; --set overrides any entry)
  affinity --config C.yaml --anchor_checkpoint A --out_dir D   the RSA affinity the edge stage reads
  configs --config P.yaml --out DIR --run_dir D   write anchor/edge/weight.yaml for running stages by hand
  evaluate --run_dir D                  the evaluation protocol: metrics.json, report.md and plots
  sweep --sweep S.yaml --run_dir D [--trials K] [--config P.yaml]
                                        a local sweep of the hypernet stages over D's anchor (D/sweeps/)
  trial --run_dir D --KEY=VALUE ...     one sweep trial (the command a W&B sweep agent runs)
  info --config P.yaml                  N, L, parameters and GFLOPs, without data or training
"""


def entry_point(argv: list[str] | None = None) -> int:
    """The ``dymu`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command in STAGE_MAINS:
        STAGE_MAINS[command](rest)
        return 0
    if command == "run":
        from stages.runner import main as run_main

        return run_main(rest)
    if command == "configs":
        from stages.runner import configs_main

        return configs_main(rest)
    if command == "affinity":
        from stages.affinity import main as affinity_main

        return affinity_main(rest)
    if command == "evaluate":
        from stages.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command in ("sweep", "trial"):
        from stages.sweep import sweep_main, trial_main

        return (sweep_main if command == "sweep" else trial_main)(rest)
    if command == "info":
        from stages.info import main as info_main

        return info_main(rest)
    print(f"dymu: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(entry_point())
