"""Faults a run must survive without losing or mixing work: a parent retrained under finished stages, a
checkpoint of the wrong stage, two commands on one run directory, unreadable files, a killed or interrupted
runner, stages that would not train, a copy of a run under another folder name."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from dymu.layout import RunLayout
from stages.cli import entry_point
from stages.lineage import LINEAGE_KEY, RunDirectoryBusy, file_hash, run_lock
from stages.pipeline import load_pipeline_config
from stages.runner import run_pipeline
from tests.test_pipeline import CSV, ROOT, tiny_config, write
from tests.test_run_robustness import one_line_error, start_long_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run (2 steps per stage, CSV logger) and its pipeline config; tests work on copies."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = write(tiny_config(steps=2, logger=CSV), tmp / "pipeline.yaml")
    return run_pipeline(cfg, tmp / "run"), cfg


def copy_run(tiny_run, tmp_path: Path, name: str = "run") -> tuple[RunLayout, Path]:
    run_dir, cfg = tiny_run
    shutil.copytree(run_dir, tmp_path / name)
    return RunLayout(tmp_path / name), cfg


def snapshot(layout: RunLayout) -> dict[str, bytes]:
    """Every artefact of a run (not its configs, which a run at a new location rewrites with its own paths)."""
    return {str(p.relative_to(layout.root)): p.read_bytes() for p in sorted(layout.root.rglob("*"))
            if p.is_file() and p.name != ".dymu.lock" and p.parent != layout.configs_dir}


# --- lineage ----------------------------------------------------------------------------------------------

def test_checkpoints_record_their_stage_config_and_parents(tiny_run):
    layout = RunLayout(tiny_run[0])
    for stage, parents in (("anchor", {}), ("edge", {"anchor_checkpoint": layout.final("anchor"),
                                                      "affinity": layout.affinity}),
                           ("weight", {"edge_checkpoint": layout.final("edge")})):
        record = torch.load(layout.final(stage), weights_only=True)[LINEAGE_KEY]
        assert record["stage"] == stage and len(record["config"]) == 64
        assert record["parents"] == {name: file_hash(path) for name, path in parents.items()}
    affinity = json.loads(layout.affinity_lineage.read_text())
    assert affinity["parents"] == {"anchor_checkpoint": file_hash(layout.final("anchor"))}
    assert affinity["config"] == file_hash(layout.affinity)  # the file's own hash: one cut short is redone
    scored = json.loads(layout.metrics.read_text())["scored"]
    assert scored["checkpoint"] == "${run_dir}/weight/final.ckpt"
    assert scored["sha256"] == file_hash(layout.final("weight"))


def test_a_retrained_anchor_makes_the_later_stages_stale(tiny_run, tmp_path, capsys):
    layout, cfg = copy_run(tiny_run, tmp_path)
    old = {stage: file_hash(layout.final(stage)) for stage in ("edge", "weight")}
    shutil.rmtree(layout.stage_dir("anchor"))
    capsys.readouterr()
    run_pipeline(cfg, layout.root)
    out = capsys.readouterr().out
    assert "anchor: training" in out and "finished checkpoint" not in out, out
    for stage, parent in (("edge", "anchor_checkpoint"), ("weight", "edge_checkpoint")):
        assert re.search(rf"{stage}: {stage}/final.ckpt is stale \(its input {parent}.* has changed", out), out
        # the stale work is kept beside, and the new checkpoint descends from the new parent
        assert file_hash(layout.root / f"{stage}.stale-1" / "final.ckpt") == old[stage]
        assert file_hash(layout.final(stage)) != old[stage]
    edge = torch.load(layout.final("edge"), weights_only=True)[LINEAGE_KEY]
    assert edge["parents"]["anchor_checkpoint"] == file_hash(layout.final("anchor"))
    assert "computing it again" in out
    assert json.loads(layout.metrics.read_text())["scored"]["sha256"] == file_hash(layout.final("weight"))


def test_evaluation_is_redone_only_when_what_it_scored_changes(tiny_run, tmp_path, capsys):
    layout, cfg = copy_run(tiny_run, tmp_path)
    capsys.readouterr()
    run_pipeline(cfg, layout.root)
    assert "already scored" in capsys.readouterr().out
    run_pipeline(load_pipeline_config(cfg, ["evaluate.seed=1"]), layout.root)
    out = capsys.readouterr().out
    assert "already scored" not in out
    assert json.loads(layout.metrics.read_text())["scored"]["options"]["seed"] == 1


def test_a_copy_under_another_folder_name_resumes_with_the_wandb_logger(tmp_path, capsys):
    """The W&B logger's default name and group contain the run folder's name: labels, not config."""
    cfg = write(tiny_config(steps=2), tmp_path / "pipeline.yaml")
    run_pipeline(cfg, tmp_path / "first", evaluate=False)
    shutil.copytree(tmp_path / "first", tmp_path / "elsewhere" / "second")
    capsys.readouterr()
    run_pipeline(cfg, tmp_path / "elsewhere" / "second", evaluate=False)
    out = capsys.readouterr().out
    assert out.count("finished checkpoint") == 3 and "training" not in out, out


@pytest.mark.parametrize("target", ["weight", "edge"])
def test_a_checkpoint_of_another_stage_is_refused(tiny_run, tmp_path, capsys, target):
    layout, cfg = copy_run(tiny_run, tmp_path)
    shutil.copy(layout.final("anchor"), layout.final(target))
    before = snapshot(layout)
    err = one_line_error(capsys, entry_point(["run", "--config", str(cfg), "--run_dir", str(layout.root)]))
    assert f"{target}/final.ckpt" in err and "written by the anchor stage" in err, err
    assert snapshot(layout) == before, "the run directory changed"
    if target == "weight":
        err = one_line_error(capsys, entry_point(["evaluate", "--run_dir", str(layout.root)]))
        assert "written by the anchor stage, not weight" in err
        assert snapshot(layout) == before, "the evaluation overwrote the report"


# --- the lock ---------------------------------------------------------------------------------------------

def test_a_second_command_on_a_run_directory_is_refused_naming_the_holder(tiny_run, tmp_path, capsys):
    layout, cfg = copy_run(tiny_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stages.lineage import run_lock\n"
         f"with run_lock({str(layout.root)!r}, 'run'):\n print('held', flush=True); time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(layout)
        for argv in (["run", "--config", str(cfg), "--run_dir", str(layout.root)],
                     ["evaluate", "--run_dir", str(layout.root)]):
            err = one_line_error(capsys, entry_point(argv))
            assert f"pid {holder.pid}" in err and "dymu run" in err and "in use" in err, err
        assert snapshot(layout) == before
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock with its holder: the run proceeds
    assert entry_point(["run", "--config", str(cfg), "--run_dir", str(layout.root)]) == 0


def test_the_lock_is_reentrant_within_one_process_and_released(tmp_path):
    with run_lock(tmp_path / "run", "run"):
        with run_lock(tmp_path / "run", "compare"):
            pass
        code = subprocess.run([sys.executable, "-c", f"from stages.lineage import run_lock\nwith run_lock("
                               f"{str(tmp_path / 'run')!r}, 'sweep'): pass"], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert code.returncode != 0 and "RunDirectoryBusy" in code.stderr
    with run_lock(tmp_path / "run", "run"):
        pass
    with run_lock(tmp_path / "missing", "compare", create=False):
        pass
    assert not (tmp_path / "missing").exists(), "a command that only reads a run created its folder"
    with pytest.raises(NotADirectoryError, match="is a file"):
        (tmp_path / "file").write_text("x")
        with run_lock(tmp_path / "file", "run"):
            pass
    assert issubclass(RunDirectoryBusy, RuntimeError)


# --- unreadable files -----------------------------------------------------------------------------------

def test_a_permission_error_is_not_taken_for_corruption(tiny_run, tmp_path, capsys, monkeypatch):
    layout, cfg = copy_run(tiny_run, tmp_path)
    before = snapshot(layout)
    real = zipfile.ZipFile
    unreadable = {str(layout.final("weight")), str(layout.last("weight"))}

    def guarded(path, *args, **kwargs):
        if str(path) in unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr("dymu.layout.zipfile.ZipFile", guarded)
    err = one_line_error(capsys, entry_point(["run", "--config", str(cfg), "--run_dir", str(layout.root)]))
    assert "weight/final.ckpt cannot be read (permission denied)" in err and "chmod" in err, err
    assert snapshot(layout) == before, "a readable-but-forbidden checkpoint was moved or replaced"
    assert not list(layout.root.rglob("*.corrupt"))


# --- checked before training ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, named", [
    ("anchor.trainer.max_steps=0", "anchor.trainer.max_steps is 0"),
    ("edge.trainer.limit_train_batches=0", "edge.trainer.limit_train_batches is 0"),
    ("evaluate.num_prefs=3", "--set evaluate.num_prefs=3: unknown key 'evaluate.num_prefs' (did you mean "
                             "'num_preferences'?)"),
    ("evaluate.budget_metric=flop", "key 'evaluate.budget_metric': expected one of 'params', 'flops', got flop"),
    ("compare.methods=[phn]", "unknown key 'compare'"),
    ("static.count=0", "key 'static.count': expected a positive int, got 0"),
    ("affinity.num_image=3", "unknown key 'affinity.num_image' (did you mean 'num_images'?)"),
    ("retrain.inits=[imagenet]", "key 'retrain.inits': expected one of 'anchor', 'scratch', got imagenet"),
])
def test_settings_that_would_waste_a_run_are_refused_before_training(tmp_path, capsys, override, named):
    cfg = write(tiny_config(), tmp_path / "pipeline.yaml")
    err = one_line_error(capsys, entry_point(["run", "--config", str(cfg), "--run_dir", str(tmp_path / "run"),
                                              "--set", override]))
    assert named in err, err
    assert not (tmp_path / "run" / "anchor").exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    cfg = write(tiny_config(), tmp_path / "pipeline.yaml")
    (tmp_path / "taken").write_text("not a run")
    err = one_line_error(capsys, entry_point(["run", "--config", str(cfg), "--run_dir", str(tmp_path / "taken")]))
    assert "is a file, not a folder" in err
    assert (tmp_path / "taken").read_text() == "not a run"


# --- a runner that is killed or interrupted ---------------------------------------------------------------

def _gone(pids: list[int], timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_runner_takes_its_stage_process_with_it(tmp_path):
    proc, _, children = start_long_run(tmp_path)
    try:
        proc.send_signal(signal.SIGKILL)  # the runner only: no chance to forward anything
        proc.wait(timeout=30)
        assert _gone(children), "the stage process kept training after its runner was killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in children:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_the_stage_and_prints_one_line(tmp_path):
    proc, run_dir, children = start_long_run(tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out  # as a shell reports Ctrl-C
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("dymu run: error")]
    assert len(errors) == 1 and "was stopped" in errors[0] and "rerun the same command" in errors[0], out
    stopped = re.search(r"stopped at step (\d+)", out)
    assert stopped, out
    assert torch.load(RunLayout(run_dir).last("anchor"), weights_only=True)["global_step"] == int(stopped.group(1))
    assert _gone(children)
