"""``dymu run``: the stages of the stage table (``stages.graph``), then the evaluation, in one run directory.

The pipeline config holds what the stages share (``data``, ``backbone``, ``seed_everything``, ``logger``)
and one section per stage of the table (``trainer``, ``model``, ``checkpoint`` as in that stage's
LightningCLI config, and ``data``: init arguments of the data module that this stage overrides, e.g. its
batch size). Before the first stage starts, every stage's config is parsed and type-checked by its
LightningCLI, the data set is checked on disk and the configured accelerator is looked for, so a typo in the
last stage fails in seconds, not after the first has trained.

The runner writes each training stage's full LightningCLI config to the run's ``configs/<stage>.yaml`` (so a
stage can be rerun by hand with ``dymu <stage> fit --config ...``) and runs it in a subprocess (so that DDP's
launcher re-executes that stage alone). A finished stage is skipped, provided its config has not changed
(paths inside the run directory are compared relative to it: a moved run matches); a started one resumes
from its newest readable checkpoint. The file names are ``dymu.layout``'s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from dymu.layout import RunLayout, checkpoint_problem, written_root
from stages.common import DEFAULT_LOGGER, build_data, read_yaml, write_yaml
from stages.graph import STAGES, Stage, order, training_stages
from stages.lineage import (
    LINEAGE_ENV,
    Lineage,
    comparable_config,
    evaluation_current,
    expected_lineage,
    read_lineage,
    record_computed_lineage,
    run_lock,
    scored_record,
)
from stages.pipeline import PipelineConfig, load_pipeline_config

GPU_ACCELERATORS = ("gpu", "cuda")


class StageFailed(RuntimeError):
    """A stage's subprocess exited with an error or was stopped."""

    exit_code = 1


class StageStopped(StageFailed):
    """A stage was stopped by a signal (Ctrl-C: exit code 130, SIGTERM: 143, as a shell reports them)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def stage_config(config: PipelineConfig, stage: str, run_dir: str | Path,
                 sources: dict[str, RunLayout] | None = None, folder: str | None = None,
                 model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full LightningCLI ``fit`` config of one training stage of the table.

    Args:
        sources: where a parent's artefacts live when not in ``run_dir`` (a sweep trial reads its parent
            run's anchor and affinity): parent name -> that run's layout.
        folder, model_args: one instance of a repeated stage (``Stage.instances``): its folder in the run
            directory (default: the stage's name) and its own model arguments.
    """
    spec = STAGES[stage]
    layout = RunLayout(run_dir)
    folder = folder or stage
    section = config.given(stage)
    trainer = section.get("trainer", {})
    trainer["default_root_dir"] = str(layout.stage_dir(folder))
    logger = copy.deepcopy(config.values.get("logger", DEFAULT_LOGGER))
    if isinstance(logger, dict) and "class_path" in logger:
        init_args = logger.setdefault("init_args", {})
        if init_args.get("save_dir") in (None, "", "."):
            init_args["save_dir"] = str(layout.stage_dir(folder))
        if logger["class_path"].endswith("WandbLogger"):
            init_args.setdefault("name", f"{layout.root.name}-{folder.replace('/', '-')}")
            init_args.setdefault("group", layout.root.name)
    trainer.setdefault("logger", logger)
    model = section.get("model", {})
    model.update(copy.deepcopy(model_args or {}))
    for key in spec.shared:
        model[key] = copy.deepcopy(config.values[key])
    if spec.seeded:
        # the preference sequence follows the run's seed unless the stage sets its own
        model.setdefault("seed", config.seed_everything)
    for argument, (parent, path) in spec.inputs.items():
        model[argument] = str(path((sources or {}).get(parent, layout)))
    data = copy.deepcopy(config.data)
    data.setdefault("init_args", {}).update(section.get("data") or {})
    out: dict[str, Any] = {"seed_everything": config.seed_everything, "trainer": trainer,
                           "model": model, "data": data}
    if "checkpoint" in section:
        out["checkpoint"] = section["checkpoint"]
    return out


def check_accelerator(stage: str, config: dict[str, Any]) -> None:
    """Refuse a stage configured for a GPU on a machine without one (a paper-size stage would otherwise run for
    weeks on CPU, or Lightning would stop with a message that names neither the stage nor the fix)."""
    import torch

    accelerator = str((config.get("trainer") or {}).get("accelerator", "auto")).lower()
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        if stage == "evaluate":
            raise ValueError(f"the evaluation asks for device '{accelerator}' but this machine has no CUDA GPU; run "
                             "it on CPU with --set evaluate.device=cpu")
        raise ValueError(f"the {stage} stage asks for accelerator '{accelerator}' but this machine has no CUDA GPU; "
                         f"run it on CPU with --set {stage}.trainer.accelerator=cpu (and --set "
                         f"{stage}.trainer.devices=1 if it asks for several)")
    if accelerator == "mps" and not (torch.backends.mps.is_available()):
        raise ValueError(f"the {stage} stage asks for accelerator 'mps', which this machine lacks; use --set "
                         f"{stage}.trainer.accelerator=cpu")


def check_stage_sections(config: PipelineConfig, stages: list[Stage], hint: str = "") -> None:
    """A stage outside the default pipeline (a baseline) must say how long it trains: without a ``trainer``
    section Lightning's default (1000 epochs) would apply."""
    missing = [s.name for s in stages if s.trained and not s.in_pipeline and not config.section(s.name).trainer]
    if missing:
        raise ValueError(f"the pipeline config has no trainer settings for the stages {missing}: "
                         f"{hint or 'add a section for each'} (see configs/quickstart.yaml's baseline sections), e.g. "
                         f"--set '{missing[0]}.trainer={{max_steps: 500, accelerator: cpu, devices: 1}}'")


def check_trains(stage: str, config: dict[str, Any]) -> None:
    """Refuse a stage configured to finish without a training step (its untrained model would be passed on)."""
    trainer = config.get("trainer") or {}
    for key in ("max_steps", "max_epochs", "limit_train_batches"):
        if trainer.get(key) == 0:
            raise ValueError(f"{stage}.trainer.{key} is 0: the stage would finish without training and pass an "
                             f"untrained model to the next stages; set a positive value (e.g. --set "
                             f"{stage}.trainer.{key}=100)")


def check_before_training(config: PipelineConfig, run_dir: Path, stages: list[Stage],
                          sources: dict[str, RunLayout] | None = None) -> dict[str, dict[str, Any]]:
    """Everything that can fail before any training, in this order: every stage config parsed and
    type-checked, the data set on disk, the accelerators present. Returns the stage configs by folder (the
    stage's name, or ``static/p00`` for an instance of a repeated stage)."""
    from stages.stage_cli import check_stage_config

    check_stage_sections(config, stages)
    configs: dict[str, dict[str, Any]] = {}
    for spec in stages:
        if spec.trained:
            for i, (folder, model_args) in enumerate(spec.instances(config)):
                configs[folder] = stage_config(config, spec.name, run_dir, sources, folder, model_args)
                if i == 0:  # the instances differ only in their model arguments' values
                    check_stage_config(spec.name, configs[folder])
                    check_trains(spec.name, configs[folder])
    build_data(config.data).check_data()  # the data set first: it is what a new user most often lacks
    for folder, stage in configs.items():
        check_accelerator(folder.split("/")[0], stage)
    if "device" in config.evaluate_given():  # the evaluation's device too, before the stages train
        check_accelerator("evaluate", {"trainer": {"accelerator": str(config.evaluate["device"]).split(":")[0]}})
    return configs


def resume_checkpoint(layout: RunLayout, stage: str) -> Path | None:
    """The newest readable checkpoint to resume ``stage`` from. A truncated or corrupt one is reported by name
    and set aside (renamed ``*.corrupt``, nothing deleted)."""
    for path in layout.resumable(stage):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        print(f"[dymu run] {stage}: {path} is {problem}; set aside as {aside.name}, trying an older checkpoint",
              file=sys.stderr)
    return None


def same_config(stored: dict[str, Any], config: dict[str, Any], stage: str, run_dir: Path) -> bool:
    """Whether a stored stage config is ``config``, with paths inside each one's run directory compared
    relative to it and the logger's labels left out (a run directory moved or copied elsewhere, under any
    folder name, matches)."""
    old_root = written_root(stored, stage) or run_dir
    return comparable_config(stored, old_root) == comparable_config(config, run_dir)


def different_config_error(layout: RunLayout, stage: str) -> ValueError:
    return ValueError(
        f"the {stage} stage in {layout.root} was run with a different config ({layout.stage_config(stage)}); its "
        f"checkpoints do not belong to this config. Use a new --run_dir, or delete {layout.stage_dir(stage)} (and "
        "the later stages) to rerun it")


def newest_intact(layout: RunLayout, stage: str) -> Path | None:
    """The stage's newest checkpoint that passes the integrity check: ``final.ckpt``, else the resumable ones."""
    for path in (layout.final(stage), *layout.resumable(stage)):
        if path.is_file() and checkpoint_problem(path) is None:
            return path
    return None


def check_lineage(layout: RunLayout, stage: str, spec: Stage, expected: Lineage) -> None:
    """Before a started stage is skipped or resumed: its newest intact checkpoint must be this stage's, made
    from the present parents. A parent that changed (a retrained anchor) makes the stage stale: its folder is
    set aside (``<stage>.stale-N``, nothing deleted) and the stage is retrained. A checkpoint of another stage is
    refused."""
    path = newest_intact(layout, stage)
    if path is None:
        return
    recorded, meta_stage = read_lineage(path)
    if recorded is None:  # written before checkpoints recorded their lineage: check the stage at least
        wanted = spec.model_class().stage_name
        if meta_stage != wanted:
            raise ValueError(f"{path} was written by {'the ' + meta_stage + ' stage' if meta_stage else 'no dymu stage'}"
                             f", not {stage}: it does not belong there; move it away (or delete "
                             f"{layout.stage_dir(stage)}) and rerun")
        return
    problem = expected.difference(recorded)
    if problem is None:
        return
    if recorded.stage != expected.stage:
        raise ValueError(f"{path}: {problem}, so it does not belong there; move it away (or delete "
                         f"{layout.stage_dir(stage)}) and rerun")
    if recorded.config != expected.config and recorded.parents == expected.parents:
        raise different_config_error(layout, stage)
    aside = layout.stale_dir(stage)
    os.replace(layout.stage_dir(stage), aside)
    print(f"[dymu run] {stage}: {path.relative_to(layout.root)} is stale ({problem}); its folder is kept as "
          f"{aside.name}, retraining")


def run_stage(stage: str, config: dict[str, Any], run_dir: str | Path, folder: str | None = None) -> None:
    """Skip, resume or start one training stage (``folder``: one instance of a repeated stage)."""
    layout = RunLayout(run_dir)
    cli_stage, stage = stage, folder or stage  # the LightningCLI to run; the folder its paths and messages name
    spec = STAGES[cli_stage]
    cfg_path = layout.stage_config(stage)
    expected = expected_lineage(stage, config, layout.root, tuple(spec.inputs))
    if layout.started(stage):
        if cfg_path.is_file() and not same_config(read_yaml(cfg_path), config, stage, layout.root):
            raise different_config_error(layout, stage)
        check_lineage(layout, stage, spec, expected)
    final = layout.final(stage)
    if final.is_file():
        problem = checkpoint_problem(final)
        if problem is None:
            print(f"[dymu run] {stage}: finished checkpoint {final} found, skipping")
            write_yaml(config, cfg_path)  # the paths of this location (the stored one may be a moved run's)
            return
        aside = final.with_name(final.name + ".corrupt")
        os.replace(final, aside)
        print(f"[dymu run] {stage}: {final} is {problem}; set aside as {aside.name}", file=sys.stderr)
    write_yaml(config, cfg_path)
    command = [sys.executable, "-m", "stages.cli", cli_stage, "fit", "--config", str(cfg_path)]
    resume = resume_checkpoint(layout, stage)
    if resume is not None:
        print(f"[dymu run] {stage}: resuming from {resume}")
        command += ["--ckpt_path", str(resume)]
    else:
        print(f"[dymu run] {stage}: training")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project_root()),
                                                                     os.environ.get("PYTHONPATH")])),
           LINEAGE_ENV: json.dumps(expected.to_dict())}
    code = run_forwarding_sigterm(command, env)
    if code != 0:
        signum = -code if code < 0 else code - 128
        stopped = signum in (signal.SIGTERM, signal.SIGINT)
        message = (f"stage {stage} {'was stopped' if stopped else 'failed'} (exit code {code}); "
                   f"{'fix the cause and ' if not stopped else ''}rerun the same command: it resumes from the "
                   f"newest checkpoint in {layout.checkpoints_dir(stage)}")
        raise StageStopped(message, signum) if stopped else StageFailed(message)
    if not final.is_file():
        raise StageFailed(f"stage {stage} ended without writing {final} (was it interrupted?); rerun to resume")


def run_forwarding_sigterm(command: list[str], env: dict[str, str]) -> int:
    """Run a stage's subprocess. A SIGTERM or SIGINT (Ctrl-C) to this process is passed on to it as SIGTERM,
    and this process waits while it saves its checkpoint and exits; if this process is killed outright, the
    kernel stops the stage too (``PR_SET_PDEATHSIG`` on Linux): no orphan keeps training."""
    process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        code = 128 + received[0]  # however the stage ended while stopping, report the stop and its signal
    return code


def _die_with_parent() -> None:
    """In the stage's process, before it runs: ask the kernel for SIGTERM when the runner dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def write_stage_configs(config: PipelineConfig, out_dir: str | Path, run_dir: str | Path,
                        source: str | Path | None = None, stages: tuple[str, ...] | None = None) -> list[Path]:
    """Write the LightningCLI config of each training stage that ``dymu run`` would train with ``run_dir`` into
    ``out_dir`` (one file per instance of a repeated stage, e.g. ``static/p00.yaml``), for running stages one by
    one with ``dymu <stage> fit --config``: by default the pipeline's own stages (``in_pipeline``), else those of
    ``stages`` (a baseline needs a section in the config, as for ``dymu run --stages``; its parents are not
    added)."""
    if stages is None:
        specs = [s for s in training_stages() if s.in_pipeline]
    else:
        specs = [s for s in order(stages) if s.name in stages]
        untrained = [s.name for s in specs if not s.trained]
        if untrained:
            raise ValueError(f"{untrained} are computed steps, not training stages: they have no stage config")
        check_stage_sections(config, specs)
    paths = []
    layout = RunLayout(run_dir)
    for spec in specs:
        for folder, model_args in spec.instances(config):
            path = Path(out_dir) / f"{folder}.yaml"
            write_yaml(stage_config(config, spec.name, run_dir, folder=folder, model_args=model_args), path)
            if source is not None:
                header = (f"# Stage '{folder}' of {source}, written by `dymu configs --config {source} --out "
                          f"{out_dir} --run_dir {run_dir}"
                          f"{'' if stages is None else ' --stages ' + ' '.join(stages)}`.\n# Edit the pipeline "
                          f"config and regenerate; run with `dymu {spec.name} fit --config <this file>`")
                if "affinity" in spec.parents:
                    header += (f"\n# after `dymu affinity --config <this file> --anchor_checkpoint "
                               f"{layout.final('anchor')} --out_dir {run_dir}`")
                path.write_text(header + ".\n" + path.read_text())
            paths.append(path)
    return paths


def run_pipeline(config: PipelineConfig | str | Path, run_dir: str | Path | None = None, evaluate: bool = True,
                 stages: tuple[str, ...] | None = None) -> Path:
    """Run the stages of a pipeline config (the whole table by default; ``("affinity",)``: the anchor and its
    affinity) and, after the last training stage, the evaluation; return the run directory (by default the
    config's ``run_dir``, else ``runs/<config file's stem>``). ``config``: the parsed config, or a file to parse
    (``load_pipeline_config``)."""
    if not isinstance(config, PipelineConfig):
        config = load_pipeline_config(config)
    layout = RunLayout(Path(run_dir or config.default_run_dir()).resolve())
    if layout.root.exists() and not layout.root.is_dir():
        raise NotADirectoryError(f"--run_dir {layout.root} is a file, not a folder: pass a new folder or one that "
                                 "`dymu run` wrote")
    plan = order(stages)
    configs = check_before_training(config, layout.root, plan)
    with run_lock(layout.root, "run"):
        config.write(layout.pipeline_config)
        for spec in plan:
            if spec.trained:
                for folder, _ in spec.instances(config):
                    run_stage(spec.name, configs[folder], layout.root, folder)
            elif not spec.finished(layout):
                if any(path.is_file() for path in spec.artefacts(layout)):
                    print(f"[dymu run] {spec.name}: its parents or its files have changed since it was computed (or "
                          "it has no record of them): computing it again")
                spec.compute_function()(config, layout)
                record_computed_lineage(layout, spec)
        if evaluate and "weight" in [s.name for s in plan]:
            evaluate_if_stale(layout, config)
    return layout.root


def evaluate_if_stale(layout: RunLayout, config: PipelineConfig) -> None:
    """Evaluate the run with the config's ``evaluate`` options unless its ``metrics.json`` already scored the
    present checkpoint with them."""
    from stages.evaluate import evaluate_run

    record = scored_record(layout.model_checkpoint(), layout.root, config.scored_evaluation())
    if evaluation_current(layout, record):
        print(f"[dymu run] evaluation: {layout.metrics} already scored {record['checkpoint']} with these options, "
              "skipping")
        return
    evaluate_run(layout.root, **config.evaluate_given(), data=config.data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline config (e.g. configs/quickstart.yaml)")
    parser.add_argument("--run_dir", default=None, help="run directory (default: the config's run_dir, "
                        "else runs/<config name>)")
    parser.add_argument("--no_evaluate", action="store_true", help="stop after the last training stage")
    parser.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                        help=f"run only these stages and their parents (of {list(STAGES)})")
    parser.add_argument("--data_root", default=None, help="the data set's root (sets data.init_args.root)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config entry, e.g. --set anchor.trainer.devices=4 (repeatable)")
    args = parser.parse_args(argv)
    config = load_pipeline_config(args.config, args.overrides, args.data_root)
    run_dir = run_pipeline(config, args.run_dir, evaluate=not args.no_evaluate,
                           stages=tuple(args.stages) if args.stages else None)
    print(f"[dymu run] done: {run_dir}")
    return 0


def configs_main(argv: list[str] | None = None) -> int:
    """``dymu configs``: write the per-stage LightningCLI configs of a pipeline config."""
    parser = argparse.ArgumentParser(prog="dymu configs", description=write_stage_configs.__doc__)
    parser.add_argument("--config", required=True, help="pipeline config")
    parser.add_argument("--out", required=True, help="folder for one <stage>.yaml per training stage")
    parser.add_argument("--run_dir", required=True, help="run directory the stage configs point at")
    parser.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                        help="write these training stages' configs instead of the pipeline's own "
                             f"({[s.name for s in training_stages() if s.in_pipeline]}), e.g. --stages phn static")
    parser.add_argument("--data_root", default=None, help="the data set's root (sets data.init_args.root)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    args = parser.parse_args(argv)
    config = load_pipeline_config(args.config, args.overrides, args.data_root)
    stages = tuple(args.stages) if args.stages else None
    for path in write_stage_configs(config, args.out, args.run_dir, source=args.config, stages=stages):
        print(path)
    return 0
