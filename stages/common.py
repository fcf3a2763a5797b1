"""Helpers shared by the runner, the evaluation and ``info``: YAML I/O and building objects from
``class_path`` / ``init_args`` dicts with jsonargparse (the same resolution LightningCLI uses).

Imports nothing heavy at the top (no torch, no Lightning): the commands that read configs answer ``--help`` and
report a bad config file in well under a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule

    from dymu.backbones.base import Backbone


def yaml_error_message(err: yaml.YAMLError, path: str | Path, fix: str = "fix the file there") -> str:
    """A YAML parse error in one line: the file, line and column, and the problem (``yaml``'s own message
    spreads over several lines and names no fix)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and getattr(err, "problem", None):
        started = (f" started at line {context_mark.line + 1}"
                   if context_mark is not None and (mark is None or context_mark.line != mark.line) else "")
        problem = f"{problem}, {' '.join(str(context).split())}{started}"
    return f"{where}: malformed YAML: {problem}; {fix}"


def load_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The parsed content of a YAML file; every way it can fail is a ``ValueError`` / ``FileNotFoundError`` with
    one line naming the file (and, for a syntax error, its line and column)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory: pass a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ValueError(yaml_error_message(err, path)) from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file (not UTF-8): pass a YAML file") from None


def read_json(path: str | Path, fix: str) -> Any:
    """The content of a JSON file that a command wrote; a truncated or malformed one is a ``ValueError`` naming
    the file, where it breaks and ``fix`` (what to delete or rerun)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (cut short or malformed: {err.msg} at line {err.lineno}, column "
                         f"{err.colno}); {fix}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a JSON text file (not UTF-8); {fix}") from None


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    data = load_yaml_file(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level")
    return data


def write_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def instantiate(base: type, config: dict[str, Any], what: str) -> Any:
    """Build a subclass of ``base`` from ``{"class_path": ..., "init_args": ...}``, with type checking."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, what, required=True)
    try:
        parsed = parser.parse_object({what: config})
    except Exception as err:  # noqa: BLE001 - jsonargparse reports several error types; add context
        raise ValueError(f"invalid {what} config {config}: {err}") from err
    return getattr(parser.instantiate_classes(parsed), what)


def build_data(config: dict[str, Any]) -> LightningDataModule:
    from lightning.pytorch import LightningDataModule

    return instantiate(LightningDataModule, config, "data")


def build_backbone_from_config(config: dict[str, Any]) -> Backbone:
    from dymu.backbones.base import Backbone

    return instantiate(Backbone, config, "backbone")


WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
DEFAULT_LOGGER = {"class_path": WANDB_LOGGER, "init_args": {"offline": True, "project": "dymu"}}
