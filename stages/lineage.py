"""What each artefact of a run was made from, and who is writing a run directory.

*Lineage.* Every training stage's checkpoint records its folder in the run (``edge``, ``static/p03``), the hash
of its stage config (paths inside the run directory written relative to it, the logger's display name and group
left out: a copy of a run under another folder name is the same run) and the SHA-256 of each parent artefact it
read (``anchor_checkpoint``, ``affinity``). The runner reads that record before it skips or resumes a stage: a
parent that has changed since (a retrained anchor) makes the stage's folder stale, so it is set aside and the
stage retrained, and so on down the table; a checkpoint written by another stage is refused. The computed
affinity keeps the same record beside it, and the evaluation records the checkpoint it scored.

*Lock.* A command that writes a run directory (``dymu run``, ``compare``, ``sweep``, ``evaluate``, a trial) holds
an exclusive ``flock`` on the run's lock file for its whole length; a second one refuses, naming the holder (the
processes that Lightning's DDP launcher starts for that command share it). The kernel releases the lock when
its process ends, however it ends. Readers (``from_run``, ``dymu info``, ``show``,
``export``) take no lock.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dymu.layout import RunLayout, relative_config, unreadable

if TYPE_CHECKING:
    from stages.graph import Stage

LINEAGE_KEY = "dymu_lineage"
"""Top-level key of a stage checkpoint's lineage record."""
LINEAGE_ENV = "DYMU_LINEAGE"
"""The environment variable through which the runner hands a stage's process its lineage record (JSON)."""
LABEL_KEYS = ("name", "group")
"""The logger's ``init_args`` that only label a run (their defaults contain the run folder's name)."""


@dataclass(frozen=True)
class Lineage:
    """What one artefact was made from.

    Attributes:
        stage: the folder of the stage in its run (``anchor``, ``static/p03``) or the computed step's name.
        config: SHA-256 of the stage's config (``config_hash``); empty for a computed step.
        parents: input name (a model argument such as ``anchor_checkpoint``) -> SHA-256 of that file.
    """

    stage: str
    config: str = ""
    parents: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Lineage | None:
        if not isinstance(data, dict) or not isinstance(data.get("stage"), str):
            return None
        parents = data.get("parents") or {}
        return cls(data["stage"], str(data.get("config", "")), {str(k): str(v) for k, v in parents.items()})

    def difference(self, recorded: Lineage) -> str | None:
        """Why ``recorded`` (read from an artefact) is not this expected lineage: None when it is."""
        if recorded.stage != self.stage:
            return f"it was written by the {recorded.stage} stage, not {self.stage}"
        changed = [name for name, digest in self.parents.items() if recorded.parents.get(name) != digest]
        if changed:
            return f"its input {', '.join(changed)} has changed since it was made"
        if self.config and recorded.config and recorded.config != self.config:
            return "it was made with another config"
        return None


_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file, remembered per (path, size, modification time) within this process."""
    from dymu.checkpoint import file_sha256

    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        try:
            _HASHES[key] = file_sha256(path)
        except PermissionError:
            raise unreadable(Path(path)) from None
    return _HASHES[key]


def without_labels(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stage config without the logger's labels (``LABEL_KEYS``)."""
    config = copy.deepcopy(config)
    logger = (config.get("trainer") or {}).get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    for item in loggers:
        if isinstance(item, dict) and isinstance(item.get("init_args"), dict):
            for key in LABEL_KEYS:
                item["init_args"].pop(key, None)
    return config


def comparable_config(config: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The form of a stage config that identifies a run: paths relative to the run, labels left out."""
    return relative_config(without_labels(config), Path(run_dir))


def config_hash(config: dict[str, Any], run_dir: str | Path) -> str:
    text = json.dumps(comparable_config(config, run_dir), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def expected_lineage(folder: str, config: dict[str, Any], run_dir: str | Path, inputs: tuple[str, ...]) -> Lineage:
    """The lineage a training stage's checkpoint must record: ``inputs`` are the model arguments that name
    parent artefacts (``Stage.inputs``); each is hashed where it exists."""
    model = config.get("model") or {}
    parents = {name: file_hash(model[name]) for name in inputs if name in model and Path(model[name]).is_file()}
    return Lineage(folder, config_hash(config, run_dir), parents)


def read_lineage(path: str | Path) -> tuple[Lineage | None, str]:
    """The lineage a stage checkpoint records, and the stage its dymu metadata names ('' if none).

    Raises:
        PermissionError: the file cannot be read (said as such, never taken for corruption).
        ValueError: the file is not a readable checkpoint.
    """
    import torch

    from dymu.checkpoint import META_KEY

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except PermissionError:
        raise unreadable(path) from None
    except Exception as err:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"cannot read checkpoint {path}: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a dymu stage checkpoint")
    meta = ckpt.get(META_KEY) or {}
    return Lineage.from_dict(ckpt.get(LINEAGE_KEY)), str(meta.get("stage", "")) if isinstance(meta, dict) else ""


def lineage_from_environment() -> dict[str, Any] | None:
    """The record the runner handed this stage process (``LINEAGE_ENV``), or None when run by hand."""
    raw = os.environ.get(LINEAGE_ENV)
    if not raw:
        return None
    record = Lineage.from_dict(json.loads(raw))
    return None if record is None else record.to_dict()


# --- computed steps (the affinity) ----------------------------------------------------------------------------

def computed_lineage(layout: RunLayout, step: Stage) -> Lineage:
    """A computed step's record: the hash of each parent stage's finished checkpoint (``<parent>_checkpoint``) and,
    as ``config``, of its own artefacts, so that a file cut short or edited since it was written is computed
    again too."""
    own = ",".join(file_hash(path) for path in step.artefacts(layout))
    return Lineage(step.name, own, {f"{parent}_checkpoint": file_hash(layout.final(parent)) for parent in step.parents})


def computed_current(layout: RunLayout, step: Stage) -> bool:
    """Whether a computed step's artefacts exist, are the files it wrote, and were computed from its present
    parents."""
    record = layout.lineage_record(step.name)
    paths = [*step.artefacts(layout), record, *(layout.final(parent) for parent in step.parents)]
    if not all(path.is_file() for path in paths):
        return False
    try:
        recorded = Lineage.from_dict(json.loads(record.read_text()))
    except (ValueError, OSError):
        return False
    return recorded is not None and recorded.to_dict() == computed_lineage(layout, step).to_dict()


def record_computed_lineage(layout: RunLayout, step: Stage) -> None:
    layout.lineage_record(step.name).write_text(json.dumps(computed_lineage(layout, step).to_dict(), indent=1))


# --- the evaluation ---------------------------------------------------------------------------------------------

def scored_record(checkpoint: Path, run_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation scored: the checkpoint (relative to the run) and its hash, and the options."""
    return {"checkpoint": str(relative_config(str(checkpoint), run_dir)), "sha256": file_hash(checkpoint),
            "options": json.loads(json.dumps(options, sort_keys=True, default=str))}


def evaluation_current(layout: RunLayout, record: dict[str, Any]) -> bool:
    """Whether the run's ``metrics.json`` scored exactly ``record`` (same checkpoint bytes, same options)."""
    try:
        stored = json.loads(layout.metrics.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and stored.get("scored") == record and layout.report.is_file()


# --- the run directory's lock -------------------------------------------------------------------------------

class RunDirectoryBusy(RuntimeError):
    """Another command holds the run directory's lock."""


_HELD: dict[str, tuple[int, Any]] = {}  # run directory -> (depth, open lock file): re-entrant within a process


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str, create: bool = True) -> Iterator[None]:
    """Hold the run directory's lock for the block (re-entrant in one process). Refuses at once, naming the
    holder, when another process holds it. With ``create=False`` a missing run directory is not created (the
    command's own check reports it) and the block runs without the lock."""
    layout = RunLayout(run_dir)
    root = layout.root.resolve()
    key = str(root)
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        yield  # a DDP process that Lightning started for the command that holds the lock
        return
    if key in _HELD:
        depth, handle = _HELD[key]
        _HELD[key] = (depth + 1, handle)
        try:
            yield
        finally:
            depth, handle = _HELD[key]
            _HELD[key] = (depth - 1, handle)
        return
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a run directory: pass a folder (new, or written by "
                                 "`dymu run`) as --run_dir")
    if not create and not root.is_dir():
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    path = RunLayout(root).lock_file
    handle = open(path, "a+")  # noqa: SIM115 - held open for the block
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _describe_holder(handle.read())
        handle.close()
        raise RunDirectoryBusy(f"{root} is in use by {holder}; wait for it to finish or stop it, then rerun (two "
                               "commands writing one run directory would mix their checkpoints)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                             "argv": sys.argv, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    _HELD[key] = (1, handle)
    try:
        yield
    finally:
        _HELD.pop(key, None)
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"`dymu {info['command']}` (pid {info['pid']} on {info['host']}, since {info['since']})")
    except (ValueError, KeyError, TypeError):
        return "another dymu command"
