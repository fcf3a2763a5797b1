"""Runs that survive what users do: typos, missing data, a machine without the configured GPU, moved run
directories, truncated checkpoints, SIGTERM, commands pointed at the wrong folder; and the run layout and the
stage table as the one place that declares them."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dymu.layout import RunLayout, checkpoint_problem, relative_config, resolve_config
from stages.cli import entry_point
from stages.graph import STAGES, order, training_stages
from stages.pipeline import PipelineConfig, load_pipeline_config
from stages.runner import run_pipeline, run_stage, stage_config
from stages.stage_cli import AtomicCheckpointIO, StageConfigError, train_seconds
from tests.test_pipeline import CSV, ROOT, tiny_config, write

PAPER_PIPELINE = ROOT / "configs" / "pascal_context" / "pipeline.yaml"


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- checked before any training ---------------------------------------------------------------------------

def test_typo_in_a_later_stage_fails_before_any_training(tmp_path, capsys):
    cfg = write(tiny_config(steps=50), tmp_path / "pipeline.yaml")
    start = time.time()
    code = entry_point(["run", "--config", str(cfg), "--run_dir", str(tmp_path / "run"),
                        "--set", "weight.model.lamda_active=1"])
    err = one_line_error(capsys, code)
    assert "weight.model.lamda_active" in err
    assert not (tmp_path / "run" / "anchor").exists(), "a stage trained before the typo was found"
    assert time.time() - start < 60


@pytest.mark.parametrize("override, named", [
    ("edge.trainer.max_steps=many", "edge.trainer.max_steps"),
    ("anchor.data.num_trian=3", "anchor.data.init_args.num_trian"),
    ("edge.modle.tau=0.3", "modle"),
    ("evaluat.num_preferences=3", "evaluat"),
])
def test_bad_keys_and_types_are_named_by_their_path(tmp_path, override, named):
    cfg = write(tiny_config(), tmp_path / "pipeline.yaml")
    with pytest.raises((StageConfigError, ValueError), match=re.escape(named)):
        run_pipeline(load_pipeline_config(cfg, [override]), tmp_path / "run")
    assert not (tmp_path / "run" / "anchor").exists()


def test_missing_data_set_is_reported_before_the_accelerator(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = entry_point(["run", "--config", str(PAPER_PIPELINE), "--run_dir", str(tmp_path / "run"),
                        "--data_root", str(empty)])
    err = one_line_error(capsys, code)
    assert str(empty) in err and "gpu backend" not in err.lower()
    assert not (tmp_path / "run" / "anchor").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_stage_on_a_cpu_machine_names_the_override(tmp_path, capsys):
    cfg = write(tiny_config(), tmp_path / "pipeline.yaml")
    code = entry_point(["run", "--config", str(cfg), "--run_dir", str(tmp_path / "run"),
                        "--set", "edge.trainer.accelerator=gpu"])
    err = one_line_error(capsys, code)
    assert "--set edge.trainer.accelerator=cpu" in err
    assert not (tmp_path / "run" / "anchor").exists()


def test_a_baseline_stage_without_trainer_settings_is_refused(tmp_path, capsys):
    cfg = write(tiny_config(), tmp_path / "pipeline.yaml")
    err = one_line_error(capsys, entry_point(["run", "--config", str(cfg), "--run_dir", str(tmp_path / "run"),
                                              "--stages", "ltb"]))
    assert "['ltb']" in err and "--set 'ltb.trainer=" in err
    assert not (tmp_path / "run" / "anchor").exists()


def test_evaluate_on_a_folder_without_a_run(tmp_path, capsys):
    err = one_line_error(capsys, entry_point(["evaluate", "--run_dir", str(tmp_path)]))
    assert str(tmp_path) in err
    err = one_line_error(capsys, entry_point(["evaluate", "--run_dir", str(tmp_path / "nowhere")]))
    assert "nowhere" in err


def test_every_command_reports_a_missing_config_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    for argv in (["run", "--config", missing], ["configs", "--config", missing, "--out", str(tmp_path),
                                                 "--run_dir", str(tmp_path)], ["info", "--config", missing]):
        err = one_line_error(capsys, entry_point(argv))
        assert "missing.yaml" in err


# --- runs that move, break or are stopped -------------------------------------------------------------------

@pytest.fixture(scope="module")
def anchor_run(tmp_path_factory):
    """The anchor stage of a tiny run (checkpoints every 2 of 4 steps) and its affinity."""
    tmp = tmp_path_factory.mktemp("anchor_run")
    config = tiny_config(steps=4, logger=CSV)
    cfg = write(config, tmp / "pipeline.yaml")
    return run_pipeline(cfg, tmp / "run", stages=("affinity",)), config


def test_relative_config_round_trip(tmp_path):
    config = {"a": str(tmp_path / "run" / "anchor" / "final.ckpt"), "b": [str(tmp_path / "runx")], "c": 3,
              "d": str(tmp_path / "run")}
    rel = relative_config(config, tmp_path / "run")
    assert rel == {"a": "${run_dir}/anchor/final.ckpt", "b": [str(tmp_path / "runx")], "c": 3, "d": "${run_dir}"}
    assert resolve_config(rel, tmp_path / "run") == config


def test_moved_run_directory_is_recognised(anchor_run, tmp_path, capsys):
    run_dir, config = anchor_run
    moved = tmp_path / "elsewhere" / "moved_run"
    shutil.copytree(run_dir, moved)
    cfg = write(config, tmp_path / "pipeline.yaml")
    run_pipeline(cfg, moved, stages=("affinity",))
    out = capsys.readouterr().out
    assert "anchor: finished checkpoint" in out and "skipping" in out
    rewritten = yaml.safe_load(RunLayout(moved).stage_config("anchor").read_text())
    assert rewritten["trainer"]["default_root_dir"] == str(moved / "anchor")


def test_moved_full_run_skips_every_stage_and_evaluates(tmp_path, capsys):
    config = tiny_config(steps=2, logger=CSV)
    cfg = write(config, tmp_path / "pipeline.yaml")
    run_dir = run_pipeline(cfg, tmp_path / "run", evaluate=False)
    moved = tmp_path / "disk2" / "run"
    shutil.move(str(run_dir), moved)
    capsys.readouterr()
    run_pipeline(cfg, moved)
    out = capsys.readouterr().out
    for spec in order():
        if spec.trained:
            assert f"{spec.name}: finished checkpoint" in out
    assert ": training" not in out and "resuming" not in out
    assert RunLayout(moved).metrics.is_file()


def test_truncated_last_checkpoint_resumes_from_the_intact_one(anchor_run, tmp_path, capsys):
    run_dir, config = anchor_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    layout = RunLayout(copy)
    steps = [p for p in layout.resumable("anchor") if p.name.startswith("step=")]
    assert steps, "the anchor kept no step=N checkpoint beside last.ckpt"
    layout.final("anchor").unlink()
    data = layout.last("anchor").read_bytes()
    layout.last("anchor").write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(layout.last("anchor")) is not None and checkpoint_problem(steps[0]) is None
    capsys.readouterr()
    run_stage("anchor", stage_config(PipelineConfig.parse(config, "test"), "anchor", copy), copy)
    captured = capsys.readouterr()
    assert "last.ckpt" in captured.err and "set aside" in captured.err
    assert f"resuming from {steps[0]}" in captured.out
    final = torch.load(layout.final("anchor"), weights_only=True)
    assert final["global_step"] == 4
    # the training time of the interrupted run carries over into the resumed one
    before = train_seconds(torch.load(steps[0], weights_only=True))
    assert 0 < before <= train_seconds(final)
    assert (layout.checkpoints_dir("anchor") / "last.ckpt.corrupt").is_file(), "the corrupt file was deleted"


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def broken(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io.TorchCheckpointIO.save_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "a temporary file was left behind"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(v) for v in out.split()]


def start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, Path, list[int]]:
    """``dymu run`` of a stage that would train for hours, in a new session, once its stage process has taken a
    few steps: the process, the run directory and the stage process's pid(s)."""
    config = tiny_config(steps=100000, logger=CSV)
    config["data"]["init_args"].update({"num_train": 16, "batch_size": 4})
    config["anchor"]["checkpoint"] = {"every_n_train_steps": 1000000}
    cfg = write(config, tmp_path / "pipeline.yaml")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "stages.cli", "run", "--config", str(cfg), "--run_dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((run_dir / "anchor").glob("**/metrics.csv")):
        time.sleep(0.2)
    time.sleep(2.0)  # a few training steps
    children = _children(proc.pid)
    if not children:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the stage subprocess did not start")
    return proc, run_dir, children


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_the_stage_with_a_checkpoint_and_no_orphan(tmp_path):
    proc, run_dir, children = start_long_run(tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)  # to the runner only, as a scheduler or `kill` would
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert all(not Path(f"/proc/{pid}").exists() for pid in children), "the stage process outlived the runner"
    stopped = re.search(r"stopped at step (\d+)", out)
    assert stopped, out
    last = RunLayout(run_dir).last("anchor")
    assert torch.load(last, weights_only=True)["global_step"] == int(stopped.group(1))
    assert "was stopped" in out and "rerun the same command" in out


# --- the layout and the stage table are declared once --------------------------------------------------------

RUN_FILE_NAMES = ("final.ckpt", "last.ckpt", "affinity.json", "affinity.png", "metrics.json", "report.md",
                  "pipeline.yaml", "trial.json", "summary.csv", "summary.md")


def test_only_the_layout_module_writes_run_file_names():
    offenders = []
    for package in ("dymu", "stages", "lightning_modules", "datamodules"):
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "dymu" / "layout.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                          and n.body and isinstance(n.body[0], ast.Expr)
                          and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                    for name in RUN_FILE_NAMES:
                        # a path built from the name (not prose that mentions it, such as a help text)
                        if re.search(rf"(^|/){re.escape(name)}$", node.value):
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "run file names outside dymu/layout.py:\n" + "\n".join(offenders)


def test_stage_table_drives_the_cli_and_the_order():
    names = list(STAGES)
    for spec in STAGES.values():  # the table lists parents first
        assert all(names.index(p) < names.index(spec.name) for p in spec.parents)
    assert [s.name for s in order()] == ["anchor", "affinity", "edge", "weight"]  # `dymu run`: DYMU's stages
    assert [s.name for s in order(("edge",))] == ["anchor", "affinity", "edge"]
    assert [s.name for s in order(("phn_bn",))] == ["anchor", "shared_mtl", "phn_bn"]
    with pytest.raises(ValueError, match="unknown stages"):
        order(("egde",))
    from stages.cli import usage

    for spec in training_stages():
        assert f"  {spec.name} " in usage()
        spec.model_class()  # importable


def test_no_import_cycle_between_cli_and_runner():
    def imports(module: str) -> set[str]:
        tree = ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    assert "stages.cli" not in imports("stages.runner")
    assert "stages.cli" not in imports("stages.stage_cli")


# the floors of the house, lowest first: a module imports only from its own floor or lower ones
FLOORS = ("dymu", "datamodules", "lightning_modules", "stages")


def _imported_packages(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_no_import_from_a_lower_floor_to_a_higher_one():
    offenders = []
    for floor, package in enumerate(FLOORS):
        for path in (ROOT / package).rglob("*.py"):
            for line, imported in _imported_packages(path):
                if imported in FLOORS[floor + 1:] or imported in ("tests", "benchmarks", "docs"):
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    for path in (ROOT / "benchmarks").rglob("*.py"):
        offenders += [f"{path.relative_to(ROOT)}:{line} imports tests" for line, imported in _imported_packages(path)
                      if imported == "tests"]
    assert not offenders, "imports from a lower floor to a higher one:\n" + "\n".join(offenders)
