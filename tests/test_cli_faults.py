"""Every `dymu` path a user can get wrong gives one clear line: malformed YAML (config, sweep, --set value), a
config that is a folder or not text, `--device cuda` without a GPU, Ctrl-C, an affinity.json cut short, a run
without its weight stage; the console stays quiet (no Lightning or W&B banners) and `--help` is fast."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import stages.runner
from dymu.affinity import load_affinity
from dymu.layout import RunLayout
from dymu.model import DynamicMultiTaskModel, IncompleteRunWarning
from stages.cli import COMMANDS, entry_point
from stages.console import QUIET_LOGGERS, take_verbose_flag
from tests.test_pipeline import ROOT, tiny_config, write

NOISE = ("GPU available", "TPU available", "Tip:", "litlogger", "litmodels", "wandb:", "LeafSpec",
         "in eval mode at the start of training", "Seed set to", "Total params")


def one_line(capsys, code: int, expected: int = 1) -> str:
    """The command's stderr, which must be one line without a traceback, and its exit code ``expected``."""
    err = capsys.readouterr().err.strip()
    assert code == expected, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@contextlib.contextmanager
def console_to(path: Path):
    """Everything this process and its subprocesses print (stdout and stderr) goes to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w", buffering=1) as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
    """A tiny run (2 steps per stage, the default W&B offline logger) stopped after the edge stage, made with the
    `dymu run` command; its pipeline config and everything it printed."""
    tmp = tmp_path_factory.mktemp("cli_faults")
    cfg = write(tiny_config(steps=2), tmp / "pipeline.yaml")
    with console_to(tmp / "console.txt"):
        code = entry_point(["run", "--config", str(cfg), "--run_dir", str(tmp / "run"), "--stages", "edge"])
    output = (tmp / "console.txt").read_text()
    assert code == 0, output
    return tmp / "run", cfg, output


# --- malformed YAML ---------------------------------------------------------------------------------------------

def test_malformed_pipeline_yaml_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("data:\n  class_path: x\n  init_args: {tasks: [semseg, depth]\nbackbone: {}\n")
    err = one_line(capsys, entry_point(["run", "--config", str(bad), "--run_dir", str(tmp_path / "run")]))
    assert err.startswith("dymu run: error: ") and f"{bad}, line 4, column 1" in err, err
    assert "malformed YAML" in err and "started at line 3" in err and "fix the file" in err, err


def test_malformed_sweep_yaml_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("method: grid\nparameters:\n  edge.model.tau:\n    values: [0.1, 0.2\n")
    err = one_line(capsys, entry_point(["sweep", "--sweep", str(bad), "--run_dir", str(tmp_path / "run")]))
    assert err.startswith("dymu sweep: error: ") and f"{bad}, line 5, column 1" in err and "malformed YAML" in err


def test_malformed_set_value_is_named_as_a_value(tmp_path, capsys):
    cfg = write(tiny_config(), tmp_path / "pipeline.yaml")
    err = one_line(capsys, entry_point(["run", "--config", str(cfg), "--set", "anchor.trainer=[1, 2"]))
    assert "--set 'anchor.trainer=[1, 2'" in err and "not valid YAML" in err and "quote it" in err, err


@pytest.mark.parametrize("kind, named", [("folder", "is a directory"), ("binary", "is not a text file")])
def test_a_config_that_is_a_folder_or_not_text_is_one_line(tmp_path, capsys, kind, named):
    path = tmp_path / "pipeline.yaml"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    err = one_line(capsys, entry_point(["run", "--config", str(path)]))
    assert str(path) in err and named in err, err


# --- the device ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_evaluate_on_cuda_without_a_gpu_says_use_cpu(tmp_path, capsys, monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, wherever this runs
    err = one_line(capsys, entry_point(["evaluate", "--run_dir", str(tmp_path), "--device", device]))
    assert "no CUDA GPU" in err and "--device cpu" in err, err


# --- Ctrl-C and the exceptions that reach the entry point -------------------------------------------------------

def _interrupted_by_lightning(argv):
    """Lightning's fit/test turn Ctrl-C into ``sys.exit(1)`` raised while handling the KeyboardInterrupt."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        sys.exit(1)


def _interrupted(argv):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command, main, resume", [
    ("run", _interrupted, True), ("run", _interrupted_by_lightning, True), ("evaluate", _interrupted, False)])
def test_ctrl_c_is_one_line_and_exit_code_130(capsys, monkeypatch, command, main, resume):
    module, _, function = COMMANDS[command][0].partition(":")
    monkeypatch.setattr(importlib.import_module(module), function, main)
    err = one_line(capsys, entry_point([command, "--run_dir", "x"]), expected=130)
    assert err.startswith(f"dymu {command}: stopped (Ctrl-C)"), err
    assert ("rerun the same command to resume" in err) == resume, err


def test_an_argument_error_still_exits_as_argparse_does(capsys):
    with pytest.raises(SystemExit) as stop:
        entry_point(["run"])  # --config is required
    assert stop.value.code == 2 and "--config" in capsys.readouterr().err


def yaml_error_of_a_file(tmp_path: Path) -> tuple[Exception, str]:
    bad = tmp_path / "options.yaml"
    bad.write_text("a: [1,\n")
    with open(bad) as fh, pytest.raises(yaml.YAMLError) as caught:
        yaml.safe_load(fh)
    return caught.value, f"{bad}, line 2, column 1: malformed YAML"


@pytest.mark.parametrize("make", [
    lambda tmp: (json.JSONDecodeError("Expecting ',' delimiter", '{"a": 1 "b"}', 8),
                 "malformed JSON (Expecting ',' delimiter at line 1, column 9)"),
    lambda tmp: (IsADirectoryError(21, "Is a directory", str(tmp / "affinity.json")),
                 f"Is a directory: {tmp / 'affinity.json'}"),
    lambda tmp: (NotADirectoryError(20, "Not a directory", str(tmp / "file" / "run")),
                 f"Not a directory: {tmp / 'file' / 'run'}"),
    yaml_error_of_a_file,
    lambda tmp: (EOFError("Ran out of input"), "Ran out of input (EOFError; DYMU_TRACEBACK=1 shows where)"),
    lambda tmp: (TypeError("unsupported operand"), "unsupported operand (TypeError; DYMU_TRACEBACK=1 shows where)"),
], ids=["json", "is_a_directory", "not_a_directory", "yaml", "eof", "unexpected"])
def test_common_exceptions_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch, make):
    error, named = make(tmp_path)

    def fails(argv):
        raise error

    monkeypatch.setattr(stages.runner, "main", fails)
    err = one_line(capsys, entry_point(["run", "--config", "x"]))
    assert err.startswith("dymu run: error: ") and named in err, err


def test_dymu_traceback_shows_the_traceback(tmp_path, monkeypatch):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("data: [\n")
    monkeypatch.setenv("DYMU_TRACEBACK", "1")
    with pytest.raises(ValueError, match="malformed YAML"):
        entry_point(["run", "--config", str(bad)])
    monkeypatch.setattr(stages.runner, "main", _interrupted)
    with pytest.raises(KeyboardInterrupt):
        entry_point(["run", "--config", str(bad)])


# --- a quiet console, -v, fast --help ---------------------------------------------------------------------------

def test_a_run_prints_no_lightning_or_wandb_banners(edge_run):
    _, _, output = edge_run
    noise = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert not noise, "\n".join(noise)
    assert "[dymu run] anchor: training" in output and "[dymu run] edge: training" in output
    assert list((edge_run[0] / "edge").glob("wandb/offline-run-*")), "W&B's offline run files are still written"


def test_verbose_flag_and_environment(monkeypatch):
    assert take_verbose_flag(["-v", "run", "--config", "c.yaml", "--verbose"]) == (["run", "--config", "c.yaml"], True)
    assert take_verbose_flag(["predict", "--", "-v"]) == (["predict", "--", "-v"], False)
    monkeypatch.delenv("DYMU_VERBOSE", raising=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ("import logging, os, sys; from stages.cli import entry_point; entry_point(sys.argv[1:]); "
              "print(os.environ.get('DYMU_VERBOSE'), "
              f"logging.getLogger({QUIET_LOGGERS[0]!r}).level, os.environ.get('WANDB_SILENT'))")
    quiet = subprocess.run([sys.executable, "-c", script, "info", "--stages"], capture_output=True, text=True,
                           env={k: v for k, v in env.items() if k != "WANDB_SILENT"}, cwd=ROOT, timeout=120)
    verbose = subprocess.run([sys.executable, "-c", script, "-v", "info", "--stages"], capture_output=True,
                             text=True, env={k: v for k, v in env.items() if k != "WANDB_SILENT"}, cwd=ROOT,
                             timeout=120)
    assert quiet.stdout.splitlines()[-1] == "None 30 true", quiet.stdout + quiet.stderr  # WARNING
    assert verbose.stdout.splitlines()[-1] == "1 0 None", verbose.stdout + verbose.stderr  # untouched


def test_help_of_every_command_is_fast_and_imports_no_torch():
    script = ("import sys, time; from stages.cli import COMMANDS, entry_point\n"
              "for command in COMMANDS:\n"
              "    start = time.perf_counter()\n"
              "    try:\n"
              "        entry_point([command, '--help'])\n"
              "    except SystemExit as stop:\n"
              "        assert stop.code == 0, command\n"
              "    print('TIME', command, time.perf_counter() - start, 'torch' in sys.modules, file=sys.stderr)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    times = [line.split() for line in proc.stderr.splitlines() if line.startswith("TIME")]
    assert [t[1] for t in times] == list(COMMANDS)
    assert all(t[3] == "False" for t in times), f"--help imported torch: {times}"
    assert elapsed < 10, f"{len(COMMANDS)} x --help took {elapsed:.1f} s"  # about 0.2 s each when idle


# --- the affinity file ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    ('{"tasks": ["semseg", "depth"], "affinity": [[1.0, 0.', "cut short or malformed JSON"),
    (b"\xff\xfe\x00", "not UTF-8"),
    ('{"tasks": ["semseg", "depth"], "affinity": [[1.0], [0.5, 1.0]]}', "affinity"),
    ('{"tasks": ["semseg", "depth"]}', "needs the keys"),
])
def test_a_bad_affinity_file_is_named_with_the_fix(tmp_path, content, problem):
    path = tmp_path / "run" / "affinity.json"
    path.parent.mkdir()
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as caught:
        load_affinity(path, ["semseg", "depth"])
    message = str(caught.value)
    assert str(path) in message and problem in message and f"delete {path}" in message, message
    assert "`dymu run`" in message and "\n" not in message


def test_an_affinity_cut_short_is_computed_again_by_the_next_run(edge_run, tmp_path, capfd):
    """The affinity's record holds the file's own hash: a file cut short or edited since it was written is not
    the run's affinity, so `dymu run` computes it again (a stage run by hand on it gets the one-line error
    of ``load_affinity``, tested above)."""
    run_dir, cfg, _ = edge_run
    layout = RunLayout(tmp_path / "run")
    shutil.copytree(run_dir, layout.root)
    shutil.rmtree(layout.stage_dir("edge"))  # the edge stage reads the affinity when it starts
    layout.affinity.write_text(layout.affinity.read_text()[:40])
    argv = ["run", "--config", str(cfg), "--run_dir", str(layout.root), "--stages", "edge"]
    capfd.readouterr()
    assert entry_point(argv) == 0
    out = capfd.readouterr().out
    assert "computing it again" in out and "computing RSA task affinity" in out, out
    load_affinity(layout.affinity, ["semseg", "depth", "normals"])


# --- a run without its weight stage -----------------------------------------------------------------------------

def test_from_run_without_a_weight_stage_warns_once_and_stage_picks_one(edge_run):
    run_dir, _, _ = edge_run
    with pytest.warns(IncompleteRunWarning, match="no finished weight stage.*BatchNorm adaptation") as caught:
        model = DynamicMultiTaskModel.from_run(run_dir)
    assert len(caught) == 1 and model.edge_hypernet is not None and model.weight_hypernet is None
    assert str(RunLayout(run_dir).final("edge")) in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DynamicMultiTaskModel.from_run(run_dir, stage="edge")  # chosen: no warning
    with pytest.raises(FileNotFoundError, match="weight stage .* has not finished"):
        DynamicMultiTaskModel.from_run(run_dir, stage="weight")
    with pytest.raises(ValueError, match="stage must be one of"):
        DynamicMultiTaskModel.from_run(run_dir, stage="wieght")


@pytest.mark.parametrize("argv", [["show", "--r", "1/3", "1/3", "1/3", "--c", "0"], ["info"]])
def test_commands_on_a_run_without_a_weight_stage_say_so_once(edge_run, capsys, argv):
    run_dir, _, _ = edge_run
    assert entry_point([*argv, "--run_dir", str(run_dir)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "no finished weight stage" in line]
    assert len(notes) == 1 and notes[0].startswith(f"dymu {argv[0]}: warning: "), captured.err
    assert "BatchNorm adaptation" in notes[0] and captured.out.strip()
