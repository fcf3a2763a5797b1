"""Helpers shared by the runner, the evaluation and ``info``: YAML I/O and building objects from
``class_path`` / ``init_args`` dicts with jsonargparse (the same resolution LightningCLI uses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule

from dymu.backbones.base import Backbone


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a YAML mapping at the top level")
    return data


def write_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def instantiate(base: type, config: dict[str, Any], what: str) -> Any:
    """Build a subclass of ``base`` from ``{"class_path": ..., "init_args": ...}``, with type checking."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, what, required=True)
    try:
        parsed = parser.parse_object({what: config})
    except Exception as err:  # noqa: BLE001 - jsonargparse reports several error types; add context
        raise ValueError(f"invalid {what} config {config}: {err}") from err
    return getattr(parser.instantiate_classes(parsed), what)


def build_data(config: dict[str, Any]) -> LightningDataModule:
    return instantiate(LightningDataModule, config, "data")


def build_backbone_from_config(config: dict[str, Any]) -> Backbone:
    return instantiate(Backbone, config, "backbone")


WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
DEFAULT_LOGGER = {"class_path": WANDB_LOGGER, "init_args": {"offline": True, "project": "dymu"}}
