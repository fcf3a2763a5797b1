"""One LightningCLI per training stage of the stage table (``dymu <stage> fit|validate --config X.yaml``), its
checkpoint callback, and the check of a stage config without building anything (``check_stage_config``)."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dymu.layout import LAST_CHECKPOINT, STEP_CHECKPOINT, RunLayout
from stages.common import DEFAULT_LOGGER
from stages.graph import STAGES
from stages.lineage import LINEAGE_ENV, LINEAGE_KEY, lineage_from_environment


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, then renames it into place: a run killed while
    saving leaves the previous checkpoint intact, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


class StageCheckpoint(ModelCheckpoint):
    """Saves ``checkpoints/last.ckpt`` (and ``step=N.ckpt``) every ``every_n_train_steps`` steps to resume a
    killed run, ``final.ckpt`` when fit finishes (the next stage's input; the runner skips a stage that has
    one), and ``last.ckpt`` when the run is stopped by SIGTERM or Ctrl-C. Paths come from ``dymu.layout``;
    every checkpoint is written atomically."""

    def __init__(self, every_n_train_steps: int = 100) -> None:
        super().__init__(dirpath=None, filename=STEP_CHECKPOINT, save_last=True, save_top_k=1,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        lineage = lineage_from_environment()  # the runner's record of this stage's config and parents
        if lineage is not None:
            checkpoint[LINEAGE_KEY] = lineage

    def _layout(self, trainer: Trainer) -> tuple[RunLayout, str]:
        stage_dir = Path(trainer.default_root_dir)
        return RunLayout(stage_dir.parent), stage_dir.name

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            layout, name = self._layout(trainer)
            self.dirpath = str(layout.checkpoints_dir(name))
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.interrupted:
            layout, name = self._layout(trainer)
            # the full state (optimiser included), so a finished stage can also be trained further
            trainer.save_checkpoint(layout.final(name), weights_only=False)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == "fit" \
                and trainer.global_step > 0 and self.dirpath is not None:
            path = Path(self.dirpath) / LAST_CHECKPOINT
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                print(f"[dymu] stopped at step {trainer.global_step}: saved {path}; rerun to resume", flush=True)


TRAIN_SECONDS = "dymu_train_seconds"
"""Where checkpoints written before the stages used Lightning's ``Timer`` kept their training seconds."""


def train_seconds(checkpoint: dict[str, Any]) -> float | None:
    """The training wall-clock seconds a stage checkpoint records, over every resumption (Lightning's ``Timer``
    state; ``dymu compare``'s x axis); None for checkpoints that record none."""
    timer = (checkpoint.get("callbacks") or {}).get(Timer.__qualname__) or {}
    value = (timer.get("time_elapsed") or {}).get("train", checkpoint.get(TRAIN_SECONDS))
    return None if value is None else float(value)


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

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, Timer) for c in trainer.callbacks):
            trainer.callbacks.append(Timer())  # the training seconds, kept over resumptions
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and "save_dir" in init_args and init_args["save_dir"] in (None, ".", ""):
            init_args["save_dir"] = config.trainer.get("default_root_dir") or "."


class _ParseOnlyCLI(DymuCLI):
    """Parses and type-checks a stage config; builds nothing."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def _cli_kwargs(stage: str) -> dict[str, Any]:
    spec = STAGES[stage]
    return {"model_class": spec.model_class(), "datamodule_class": LightningDataModule, "subclass_mode_data": True,
            "link_input_shape": spec.link_input_shape, "trainer_defaults": {"logger": DEFAULT_LOGGER}}


def stage_main(stage: str, args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DymuCLI:
    """Run one training stage's LightningCLI (``dymu <stage> ...``; tests call this directly)."""
    # sys.argv keeps the stage name so that DDP's launcher re-executes the same command; LightningCLI gets
    # the arguments after it and would otherwise warn that they differ from sys.argv.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    sigint_as_sigterm()
    return DymuCLI(args=args, run=run, save_config_kwargs={"overwrite": True}, **_cli_kwargs(stage))


def sigint_as_sigterm() -> None:
    """Ctrl-C in a stage process that the runner started is handled as SIGTERM (Lightning stops at the next
    step, the stage checkpoint saves ``last.ckpt``), as the runner's own Ctrl-C is passed on to it."""
    if LINEAGE_ENV in os.environ and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


class StageConfigError(ValueError):
    """A stage config that its LightningCLI refuses."""


def check_stage_config(stage: str, config: dict[str, Any]) -> None:
    """Parse and type-check one stage's full LightningCLI config (classes, argument names and types) without
    building the model or data; an error names the stage and the key's path (``edge.model.lamda_active``)."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)  # the parse seeds the RNGs and would say so once per stage
    try:
        _ParseOnlyCLI(args=config, run=False, parser_kwargs={"exit_on_error": False}, **_cli_kwargs(stage))
    except (SystemExit, Exception) as err:  # noqa: BLE001 - jsonargparse raises several types; add the stage
        raise StageConfigError(f"the {stage} stage's config is invalid: {config_error_message(str(err), stage)}"
                               ) from None
    finally:
        seed_logger.setLevel(level)


def config_error_message(message: str, stage: str) -> str:
    """jsonargparse's error in one line (``stages.pipeline.error_line``), with the key named by its path in the
    pipeline config (``edge.model.lamda_active``, ``anchor.data.init_args.num_trian``)."""
    from stages.pipeline import error_line

    message = " ".join(message.split())
    data = re.search(r"Problem with given class_path '([\w.]+)': Option '([\w.]+)' is not accepted", message)
    if data:
        return f"unknown key '{stage}.data.init_args.{data.group(2)}' ({data.group(1)} does not take it)"
    message = re.sub(r"Parser key \"(?:\w+\.)?((?:trainer|model|data|checkpoint)[\w.]*)\"", r'Parser key "\1"', message)
    return error_line(message, prefix=f"{stage}.")
