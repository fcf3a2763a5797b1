"""The ``dymu`` command: one LightningCLI per training stage of the stage table (``dymu <stage> fit|validate
--config X.yaml``), and the commands that drive runs (``run``, ``configs``, ``affinity``, ``evaluate``,
``sweep``, ``trial``, ``show``, ``export``, ``predict``, ``info``). Every command fails on bad input with one
line and a non-zero exit."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import zipfile

import yaml

from stages.console import VERBOSE_ENV, quiet_console, take_verbose_flag
from stages.graph import STAGES, training_stages

# command -> (module:function, arguments, what it does)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("stages.runner:main", "--config P.yaml [--run_dir D] [--stages S ...]",
            "the stages of the stage table, then evaluate, in one run directory"),
    "configs": ("stages.runner:configs_main", "--config P.yaml --out DIR --run_dir D [--stages S ...]",
                "write one <stage>.yaml per training stage (the pipeline's, or S), for running stages by hand"),
    "affinity": ("stages.affinity:main", "--config C.yaml --anchor_checkpoint A --out_dir D",
                 "the RSA affinity the edge stage reads"),
    "evaluate": ("stages.evaluate:main", "--run_dir D", "the evaluation protocol: metrics.json, report.md, plots"),
    "compare": ("stages.compare:main", "--run_dir D [--methods phn phn_bn static] [--set KEY=VALUE]",
                "train the missing baselines, score them with the protocol: D/compare/ (tables 1-4, figure 6)"),
    "sweep": ("stages.sweep:sweep_main", "--sweep S.yaml --run_dir D [--trials K] [--config P.yaml]",
              "a local sweep of the hypernet stages over D's anchor (D/sweeps/)"),
    "trial": ("stages.sweep:trial_main", "--run_dir D --KEY=VALUE ...",
              "one sweep trial (the command a W&B sweep agent runs)"),
    "show": ("stages.serve:show_main", "--run_dir D --r R... --c C [--budget B] [--out F.png]",
             "the tree of a preference: which nodes are computed, cross-task edges, params and GFLOPs"),
    "export": ("stages.serve:export_main",
               "--run_dir D (--r R... --c C | --all_trees) [--budget B] --format onnx|torchscript|pt2 --out F",
               "the folded static network of a preference (or every distinct one of a grid), checked against "
               "PyTorch, F.json beside it"),
    "predict": ("stages.serve:predict_main", "(--run_dir D --r R... --c C [--budget B] | --model F) --out DIR "
                "(IMAGE_OR_DIR... | --test_images N)",
                "per-task outputs of images: segmentation / depth / normals PNGs, class scores JSON"),
    "info": ("stages.info:main", "--config P.yaml [--set KEY=VALUE] | --stages",
             "sizes without data or training, beside the paper's (tables 1-4); the stage table"),
}


def usage() -> str:
    lines = ["usage: dymu COMMAND [ARGS]", "", "training stages (LightningCLI; `dymu STAGE fit --help`):"]
    for spec in training_stages():
        lines.append(f"  {spec.name:<9} fit|validate --config X.yaml   {spec.summary}")
    lines += ["", "commands:"]
    for name, (_, args, what) in COMMANDS.items():
        lines.append(f"  {name:<9} {args}")
        lines.append(f"  {'':<9}   {what}")
    lines += ["", "Common options of `run`: --data_root R (sets data.init_args.root), --set KEY=VALUE (any entry, "
              "e.g. --set anchor.trainer.devices=4; repeatable).",
              "Every command: -v/--verbose (or DYMU_VERBOSE=1) shows Lightning's and W&B's full console output; an "
              "error is one line, exit code 1 (DYMU_TRACEBACK=1 shows the traceback); Ctrl-C stops with one line "
              "(rerun run, compare or sweep to resume)."]
    return "\n".join(lines)


USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError, zipfile.BadZipFile, yaml.YAMLError, EOFError,
               pickle.UnpicklingError)
"""What bad input raises: a bad config, a missing or unreadable file, a failed stage, a corrupt file."""

OWN_PACKAGES = ("stages", "dymu", "lightning_modules", "datamodules")

# commands that a rerun resumes (finished stages are skipped, a started one resumes from its checkpoint)
RESUMABLE = ("run", "compare", "sweep", "trial")


def entry_point(argv: list[str] | None = None) -> int:
    """The ``dymu`` console script."""
    argv, verbose = take_verbose_flag(list(sys.argv[1:] if argv is None else argv))
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # the stage subprocesses too
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in STAGES and STAGES[command].trained:
        quiet_console()

        def stage() -> int:
            from stages.stage_cli import stage_main

            stage_main(command, rest)
            return 0

        return _guarded(command, stage)
    if command in COMMANDS:
        quiet_console()
        module, _, function = COMMANDS[command][0].partition(":")
        return _guarded(command, lambda: getattr(importlib.import_module(module), function)(rest))
    print(f"dymu: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


def _guarded(command: str, call) -> int:  # noqa: ANN001
    """Run a command; a user error (bad config, missing file, failed stage) is one line on stderr, exit 1; Ctrl-C
    is one line, exit 130. ``DYMU_TRACEBACK=1`` shows the traceback instead."""
    try:
        return int(call() or 0)
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C inside fit/test into sys.exit(1), raised while it handles the KeyboardInterrupt
        if isinstance(err, SystemExit) and not isinstance(err.__context__, KeyboardInterrupt) \
                or os.environ.get("DYMU_TRACEBACK"):
            raise
        resume = "; rerun the same command to resume" if command in RESUMABLE else ""
        print(f"dymu {command}: stopped (Ctrl-C){resume}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error is one line; DYMU_TRACEBACK=1 shows where
        if os.environ.get("DYMU_TRACEBACK"):
            raise
        print(f"dymu {command}: error: {error_message(err)}", file=sys.stderr)
        return int(getattr(err, "exit_code", 1))  # a stage stopped by Ctrl-C or SIGTERM: 130 or 143


def error_message(err: BaseException) -> str:
    """One line for an exception: its message (with the file where the exception names one), and, for a type
    that is not a plain bad-input error, the type and how to see where it came from."""
    name = type(err).__name__
    if isinstance(err, yaml.YAMLError):
        from stages.common import yaml_error_message

        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        source = getattr(mark, "name", None)
        if source in (None, "<unicode string>", "<string>", "<byte string>"):  # a value, e.g. of --set
            return yaml_error_message(err, "a YAML value (e.g. of --set KEY=VALUE)", "quote or fix the value")
        return yaml_error_message(err, source)
    if isinstance(err, json.JSONDecodeError):
        return f"malformed JSON ({err.msg} at line {err.lineno}, column {err.colno}) in a file this command " \
               f"reads (DYMU_TRACEBACK=1 shows which)"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        return f"{err.strerror}: {err.filename}{target}"
    message = " ".join(str(err).split()) or name
    ours = type(err).__module__.split(".")[0] in OWN_PACKAGES  # StageFailed, RunDirectoryBusy: said in full
    if not ours and (not isinstance(err, USER_ERRORS) or isinstance(err, (RuntimeError, KeyError, EOFError))):
        message += f" ({name}; DYMU_TRACEBACK=1 shows where)"
    return message


if __name__ == "__main__":
    sys.exit(entry_point())
