"""The ``dymu`` command: one LightningCLI per training stage of the stage table (``dymu <stage> fit|validate
--config X.yaml``), and the commands that drive runs (``run``, ``configs``, ``affinity``, ``evaluate``,
``sweep``, ``trial``, ``show``, ``export``, ``predict``, ``info``). Every command fails on bad input with one
line and a non-zero exit."""

from __future__ import annotations

import importlib
import sys
import zipfile

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
    "predict": ("stages.serve:predict_main", "--run_dir D --r R... --c C [--budget B] --out DIR IMAGE_OR_DIR...",
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
              "e.g. --set anchor.trainer.devices=4; repeatable)."]
    return "\n".join(lines)


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, RuntimeError,
               zipfile.BadZipFile)


def entry_point(argv: list[str] | None = None) -> int:
    """The ``dymu`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in STAGES and STAGES[command].trained:
        from stages.stage_cli import stage_main

        return _guarded(command, lambda: (stage_main(command, rest), 0)[1])
    if command in COMMANDS:
        module, _, function = COMMANDS[command][0].partition(":")
        return _guarded(command, lambda: getattr(importlib.import_module(module), function)(rest))
    print(f"dymu: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


def _guarded(command: str, call) -> int:  # noqa: ANN001
    """Run a command; a user error (bad config, missing file, failed stage) is one line on stderr, exit 1.
    ``DYMU_TRACEBACK=1`` shows the traceback instead."""
    import os

    try:
        return int(call() or 0)
    except USER_ERRORS as err:
        if os.environ.get("DYMU_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, (RuntimeError, KeyError)) and type(err).__name__ != "StageFailed":
            message += f" ({type(err).__name__}; DYMU_TRACEBACK=1 shows where)"
        print(f"dymu {command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(entry_point())
