"""The run directory's layout: the one place where a run's file and folder names are written.

::

    <run_dir>/
      configs/pipeline.yaml          the pipeline config as run (``dymu run``)
      configs/<stage>.yaml           each training stage's full LightningCLI config
      <stage>/final.ckpt             a finished stage (the next stage's input; the runner skips the stage)
      <stage>/checkpoints/last.ckpt  the newest resumable state (and step=N.ckpt beside it)
      affinity.json, affinity.png    the anchor's task affinity (the edge stage's input)
      affinity.lineage.json          the hash of the anchor it was computed from
      .dymu.lock                     held (flock) by the command writing the run; names its holder
      <stage>.stale-N/               a stage set aside because a parent changed under it (kept, not deleted)
      evaluation/                    metrics.json, report.md and the figures of ``dymu evaluate``
      sweeps/<trial>/                one folder per sweep trial (a run directory of its own for the
                                     hypernet stages), summary.csv and summary.md
      compare/                       the baselines' comparison (``dymu compare``)

Paths stored in a run's configs are resolved against the run directory (``relative_config`` and
``resolve_config``), so a run directory can be moved or copied to another disk or machine.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FINAL_CHECKPOINT = "final.ckpt"
LAST_CHECKPOINT = "last.ckpt"
STEP_CHECKPOINT = "{step}"  # ModelCheckpoint's filename template: step=N.ckpt
CONFIGS = "configs"
PIPELINE_CONFIG = "pipeline.yaml"
AFFINITY = "affinity.json"
AFFINITY_PLOT = "affinity.png"
LINEAGE_RECORD = "{step}.lineage.json"  # a computed step's record of what it was computed from
LOCK = ".dymu.lock"
STALE = "{folder}.stale-{n}"  # a stage's folder set aside because a parent changed under it
EVALUATION = "evaluation"
METRICS = "metrics.json"
REPORT = "report.md"
SWEEPS = "sweeps"
TRIAL_RESULT = "trial.json"
SWEEP_SUMMARY = "summary"  # summary.csv, summary.md; summary_<sweep name>.* kept per sweep file
COMPARE = "compare"
TRAINING_EFFICIENCY_PLOT = "training_efficiency.png"
RUN_DIR_MARK = "${run_dir}"
_STEP = re.compile(r"step=(\d+)\.ckpt$")


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # configs
    @property
    def configs_dir(self) -> Path:
        return self.root / CONFIGS

    @property
    def pipeline_config(self) -> Path:
        return self.configs_dir / PIPELINE_CONFIG

    def stage_config(self, stage: str) -> Path:
        return self.configs_dir / f"{stage}.yaml"

    # stages
    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def final(self, stage: str) -> Path:
        return self.stage_dir(stage) / FINAL_CHECKPOINT

    def checkpoints_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def last(self, stage: str) -> Path:
        return self.checkpoints_dir(stage) / LAST_CHECKPOINT

    def resumable(self, stage: str) -> list[Path]:
        """The stage's resumable checkpoints, newest first: ``last.ckpt``, then ``step=N.ckpt`` by N."""
        folder = self.checkpoints_dir(stage)
        steps = sorted((int(m.group(1)), p) for p in folder.glob("step=*.ckpt") if (m := _STEP.search(p.name)))
        last = [self.last(stage)] if self.last(stage).is_file() else []
        return last + [p for _, p in reversed(steps)]

    def started(self, stage: str) -> bool:
        return self.final(stage).is_file() or bool(self.resumable(stage))

    # artefacts
    @property
    def affinity(self) -> Path:
        return self.root / AFFINITY

    @property
    def affinity_plot(self) -> Path:
        return self.root / AFFINITY_PLOT

    def lineage_record(self, step: str) -> Path:
        """The record of what a computed step's artefacts were computed from (``affinity.lineage.json``)."""
        return self.root / LINEAGE_RECORD.format(step=step)

    @property
    def affinity_lineage(self) -> Path:
        return self.lineage_record("affinity")

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK

    def stale_dir(self, stage: str) -> Path:
        """A free name for setting aside ``stage``'s folder: ``<stage>.stale-1``, ``-2``, ..."""
        n = 1
        while (path := self.root / STALE.format(folder=stage, n=n)).exists():
            n += 1
        return path

    @property
    def evaluation_dir(self) -> Path:
        return self.root / EVALUATION

    @property
    def metrics(self) -> Path:
        return self.evaluation_dir / METRICS

    @property
    def report(self) -> Path:
        return self.evaluation_dir / REPORT

    @property
    def sweeps_dir(self) -> Path:
        return self.root / SWEEPS

    def trial_dir(self, name: str) -> Path:
        return self.sweeps_dir / name

    def trial_result(self, name: str) -> Path:
        return self.trial_dir(name) / TRIAL_RESULT

    def sweep_summary(self, suffix: str, sweep_name: str = "") -> Path:
        """``summary.<suffix>`` of the latest sweep, or ``summary_<sweep_name>.<suffix>``."""
        return self.sweeps_dir / f"{SWEEP_SUMMARY}{'_' + sweep_name if sweep_name else ''}.{suffix}"

    @property
    def compare_dir(self) -> Path:
        return self.root / COMPARE

    @property
    def compare_metrics(self) -> Path:
        return self.compare_dir / METRICS

    @property
    def compare_report(self) -> Path:
        return self.compare_dir / REPORT

    @property
    def compare_plot(self) -> Path:
        """Figure 6: hypervolume against training time."""
        return self.compare_dir / TRAINING_EFFICIENCY_PLOT

    # whole-run questions
    def is_run(self) -> bool:
        """Whether the folder was written by ``dymu run`` (or holds a stage config of it)."""
        return self.pipeline_config.is_file() or any(self.configs_dir.glob("*.yaml"))

    def model_checkpoint(self) -> Path:
        """The checkpoint of the run's controllable model: the weight stage's, else the edge stage's. A
        checkpoint that another stage wrote (an anchor's copied into ``weight/``) is refused."""
        for stage in ("weight", "edge"):
            if self.final(stage).is_file():
                from dymu.checkpoint import checkpoint_stage

                written_by = checkpoint_stage(self.final(stage))
                if written_by != stage:
                    raise ValueError(f"{self.final(stage)} was written by the {written_by or 'unknown'} stage, not "
                                     f"{stage}: it does not belong there; put back the {stage} stage's checkpoint, "
                                     f"or delete {self.stage_dir(stage)} and rerun `dymu run`")
                return self.final(stage)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} does not exist: pass the folder that `dymu run` wrote")
        raise FileNotFoundError(f"{self.root} holds no finished edge or weight stage ({self.final('weight')} or "
                                f"{self.final('edge')}): is it a run directory, and have its stages finished? "
                                "Rerun `dymu run` with the same --run_dir to finish it")


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a readable checkpoint (None when it looks intact).

    A torch checkpoint is a zip archive; a truncated or partly written file loses its central directory or
    its last members. Checked without loading the tensors.

    Raises:
        PermissionError: the file exists but cannot be read: a fault of its permissions, not of its content, so
            never a reason to set it aside.
    """
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"member {info.filename} runs past the end of the file (truncated)"
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        raise unreadable(path) from None
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"not a readable checkpoint ({err})"
    return None


def unreadable(path: Path) -> PermissionError:
    """The error for a file that exists but cannot be read: its permissions, not its content, are at fault."""
    return PermissionError(f"{path} cannot be read (permission denied); fix its permissions (chmod u+r) and rerun: "
                           "nothing was changed")


def written_root(stage_config: dict[str, Any], stage: str) -> Path | None:
    """The run directory a stored stage config was written for (its ``trainer.default_root_dir`` is
    ``<run_dir>/<stage>``; ``stage`` may be an instance's folder such as ``static/p00``), or None."""
    root_dir = (stage_config.get("trainer") or {}).get("default_root_dir")
    if isinstance(root_dir, str) and root_dir.endswith("/" + stage):
        return Path(root_dir[: -len(stage) - 1])
    return None


def relative_config(value: Any, run_dir: Path) -> Any:
    """A copy of a config in which every path inside ``run_dir`` is written relative to it
    (``${run_dir}/anchor/final.ckpt``): the form compared when a run is resumed, so a moved run matches."""
    root = str(Path(run_dir))
    if isinstance(value, dict):
        return {k: relative_config(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_config(v, run_dir) for v in value]
    if isinstance(value, str) and (value == root or value.startswith(root + "/")):
        return RUN_DIR_MARK + value[len(root):]
    return value


def resolve_config(value: Any, run_dir: Path) -> Any:
    """The inverse of ``relative_config``: ``${run_dir}`` replaced by ``run_dir``."""
    if isinstance(value, dict):
        return {k: resolve_config(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_config(v, run_dir) for v in value]
    if isinstance(value, str) and value.startswith(RUN_DIR_MARK):
        return str(Path(run_dir)) + value[len(RUN_DIR_MARK):]
    return value
