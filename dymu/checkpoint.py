"""Reading stage checkpoints safely (``weights_only=True``) and recording where each came from."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

META_KEY = "dymu"
"""Key of the metadata that every stage writes into its checkpoint (``DynamicMultiTaskModel.config``,
the stage's name and its parent checkpoint's path and hash)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check it carries dymu metadata (``mmap``: map the
    tensors from the file instead of reading them, for reading the metadata alone).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint that a dymu stage wrote.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; point the stage at the .ckpt file that the "
                                "previous stage wrote (the final checkpoint in its stage folder of the run directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the cause
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a dymu stage checkpoint (no '{META_KEY}' metadata or 'state_dict')")
    return ckpt


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def checkpoint_stage(path: str | Path) -> str:
    """The stage that wrote a dymu checkpoint (its metadata's ``stage``; '' when it names none), read without
    loading its tensors into memory."""
    ckpt = load_checkpoint(path, mmap=True)
    return str(ckpt[META_KEY].get("stage", "")) if isinstance(ckpt[META_KEY], dict) else ""
