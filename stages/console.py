"""A quiet console for ``dymu`` commands: Lightning's and W&B's banners, tips and hints off, so that what is left
is the progress bar, the ``[dymu run] ...`` lines, warnings, errors and the results.

``quiet_console()`` is called by the ``dymu`` entry point (``stages.cli``) in the command's process; the stage
subprocesses of ``dymu run`` go through the same entry point. ``dymu -v ...`` / ``--verbose`` or
``DYMU_VERBOSE=1`` keeps the full output. Imports nothing heavy: the hooks apply when Lightning / W&B load.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

VERBOSE_ENV = "DYMU_VERBOSE"
VERBOSE_FLAGS = ("-v", "--verbose")

# Lightning's INFO lines of an ordinary run: "GPU available: ...", "TPU available: ...", the LitLogger and
# litmodels tips, "You are using a CUDA device ... Tensor Cores", "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES",
# "Seed set to 0", the model summary table, "Restoring states from the checkpoint ...", "Initializing
# distributed: ...". Their warnings still show.
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.fabric.utilities.distributed",
    "lightning.pytorch.accelerators.cuda",
    "lightning.pytorch.callbacks.model_summary",
    "lightning.pytorch.callbacks.rich_model_summary",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
    "lightning.pytorch.trainer.connectors.signal_connector",
)

# W&B's own lines (run name, "syncing is set to `offline`", "You can sync this run ... wandb sync ...", "Find
# logs at ...") are off with WANDB_SILENT; a run's files are written as before.
QUIET_ENV = {"WANDB_SILENT": "true"}

# Python warnings that every run of this project would print, about nothing the user can change: the frozen
# anchor's modules are in eval mode on purpose (edge and weight stages), and Lightning's use of a torch API
# that torch deprecated.
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def take_verbose_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``-v`` / ``--verbose`` (before any ``--``), and whether one was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]
    return kept, len(kept) != len(argv)


def quiet_console() -> bool:
    """Quiet Lightning's and W&B's console output in this process and its subprocesses, unless verbose
    (``DYMU_VERBOSE=1``); returns whether it did. Idempotent."""
    if verbose():
        return False
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:  # a level set higher by the user stays
            logger.setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    after_import("wandb.errors.term", _silence_wandb_setup)
    return True


def _silence_wandb_setup(term: ModuleType) -> None:
    """W&B prints a warning about the ``anonymous`` argument (which Lightning's WandbLogger always passes) while
    it checks ``wandb.init``'s arguments, before it reads WANDB_SILENT; apply WANDB_SILENT from the start."""
    if os.environ.get("WANDB_SILENT", "").lower() == "true" and hasattr(term, "_silent"):
        term._silent = True


def after_import(name: str, action: Callable[[ModuleType], None]) -> None:
    """Call ``action(module)`` once ``name`` is imported (now, if it already is); nothing if it never is."""
    if name in sys.modules:
        _run_quietly(action, sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, action))


def _run_quietly(action: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        action(module)
    except Exception:  # noqa: BLE001 - a console nicety must never break a command
        pass


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of one module so that ``action`` runs after the module loads."""

    def __init__(self, name: str, action: Callable[[ModuleType], None]) -> None:
        self.name, self.action = name, action

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one module, once; and find_spec below must not find this finder
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenLoader(spec.loader, self.action)
        return spec


class _ThenLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, action: Callable[[ModuleType], None]) -> None:
        self._loader, self._action = loader, action

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run_quietly(self._action, module)
