"""``dymu run``: anchor -> affinity -> edge -> weight -> evaluate, in one run directory.

The pipeline config holds what the stages share (``data``, ``backbone``, ``seed_everything``) and one
section per stage (``trainer``, ``model``, ``checkpoint`` as in that stage's LightningCLI config, and
``data``: init arguments of the data module that this stage overrides, e.g. its batch size). The
runner writes each stage's full LightningCLI config to ``<run_dir>/configs/<stage>.yaml`` (so a stage can
be rerun by hand with ``dymu <stage> fit --config ...``) and runs it in a subprocess (so that DDP's
launcher re-executes that stage alone). A stage with ``final.ckpt`` is skipped, provided its config has
not changed; one with ``checkpoints/last.ckpt`` resumes from it.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.cli import DEFAULT_LOGGER, FINAL_CHECKPOINT
from stages.common import build_data, read_yaml, write_yaml

STAGES = ("anchor", "edge", "weight")
KNOWN_KEYS = {"run_dir", "seed_everything", "data", "backbone", "logger", "affinity", "evaluate", *STAGES}
STAGE_KEYS = {"trainer", "model", "checkpoint", "data"}


class StageFailed(RuntimeError):
    """A stage's subprocess exited with an error."""


def check_pipeline_config(config: dict[str, Any], path: str | Path) -> None:
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; allowed: {sorted(KNOWN_KEYS)}")
    missing = [k for k in ("data", "backbone") if k not in config]
    if missing:
        raise ValueError(f"{path}: missing required sections {missing}")
    for stage in STAGES:
        extra = sorted(set(config.get(stage) or {}) - STAGE_KEYS)
        if extra:
            raise ValueError(f"{path}: section {stage!r} has unknown keys {extra}; allowed: {sorted(STAGE_KEYS)}")


def stage_config(config: dict[str, Any], stage: str, run_dir: Path) -> dict[str, Any]:
    """The full LightningCLI ``fit`` config of one stage."""
    section = copy.deepcopy(config.get(stage) or {})
    trainer = section.get("trainer", {})
    trainer["default_root_dir"] = str(run_dir / stage)
    logger = copy.deepcopy(config.get("logger", DEFAULT_LOGGER))
    if isinstance(logger, dict) and "class_path" in logger:
        init_args = logger.setdefault("init_args", {})
        if init_args.get("save_dir") in (None, "", "."):
            init_args["save_dir"] = str(run_dir / stage)
        if logger["class_path"].endswith("WandbLogger"):
            init_args.setdefault("name", f"{run_dir.name}-{stage}")
            init_args.setdefault("group", run_dir.name)
    trainer.setdefault("logger", logger)
    model = section.get("model", {})
    if stage == "anchor":
        model["backbone"] = copy.deepcopy(config["backbone"])
    else:
        # the hypernet stages' preference sequence follows the run's seed unless set on its own
        model.setdefault("seed", config.get("seed_everything", 0))
    if stage == "edge":
        model["anchor_checkpoint"] = str(run_dir / "anchor" / FINAL_CHECKPOINT)
        model["affinity"] = str(run_dir / "affinity.json")
    elif stage == "weight":
        model["edge_checkpoint"] = str(run_dir / "edge" / FINAL_CHECKPOINT)
    data = copy.deepcopy(config["data"])
    data.setdefault("init_args", {}).update(section.get("data") or {})
    out: dict[str, Any] = {"seed_everything": config.get("seed_everything", 0), "trainer": trainer,
                           "model": model, "data": data}
    if "checkpoint" in section:
        out["checkpoint"] = section["checkpoint"]
    return out


def run_stage(stage: str, config: dict[str, Any], run_dir: Path) -> None:
    """Skip, resume or start one stage."""
    stage_dir = run_dir / stage
    cfg_path = run_dir / "configs" / f"{stage}.yaml"
    final = stage_dir / FINAL_CHECKPOINT
    if cfg_path.is_file() and (final.is_file() or (stage_dir / "checkpoints" / "last.ckpt").is_file()):
        if read_yaml(cfg_path) != config:
            raise ValueError(
                f"the {stage} stage in {run_dir} was run with a different config ({cfg_path}); its checkpoints "
                f"do not belong to this config. Use a new --run_dir, or delete {stage_dir} (and the later "
                "stages) to rerun it")
    if final.is_file():
        print(f"[dymu run] {stage}: finished checkpoint {final} found, skipping")
        return
    write_yaml(config, cfg_path)
    command = [sys.executable, "-m", "stages.cli", stage, "fit", "--config", str(cfg_path)]
    last = stage_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"[dymu run] {stage}: resuming from {last}")
        command += ["--ckpt_path", str(last)]
    else:
        print(f"[dymu run] {stage}: training")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project_root()),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise StageFailed(f"stage {stage} failed (exit code {result.returncode}); fix the cause and rerun the "
                          f"same command: it resumes from {last} if it was written")
    if not final.is_file():
        raise StageFailed(f"stage {stage} ended without writing {final} (was it interrupted?); rerun to resume")


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``config`` with ``dotted.key=value`` overrides applied (values parsed as YAML), e.g.
    ``data.init_args.root=/data/NYUD_MT`` or ``anchor.trainer.devices=4``."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like dotted.key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section (it holds {child!r})")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return config


def load_pipeline_config(config_path: str | Path, overrides: list[str] | None = None,
                         data_root: str | None = None) -> dict[str, Any]:
    """Read and check a pipeline config, applying ``--set`` overrides and ``--data_root``."""
    config = read_yaml(config_path)
    if data_root is not None:
        config.setdefault("data", {}).setdefault("init_args", {})["root"] = data_root
    config = apply_overrides(config, overrides or [])
    check_pipeline_config(config, config_path)
    return config


def write_stage_configs(config: dict[str, Any], out_dir: str | Path, run_dir: str | Path,
                        source: str | Path | None = None) -> list[Path]:
    """Write each stage's LightningCLI config (the one ``dymu run`` would use with ``run_dir``) into
    ``out_dir``, for running stages one by one with ``dymu <stage> fit --config``."""
    paths = []
    for stage in STAGES:
        path = Path(out_dir) / f"{stage}.yaml"
        write_yaml(stage_config(config, stage, Path(run_dir)), path)
        if source is not None:
            header = (f"# Stage '{stage}' of {source}, written by `dymu configs --config {source} --out {out_dir} "
                      f"--run_dir {run_dir}`.\n# Edit the pipeline config and regenerate; run with `dymu {stage} "
                      "fit --config <this file>`")
            if stage == "edge":
                header += (f"\n# after `dymu affinity --config <this file> --anchor_checkpoint "
                           f"{Path(run_dir) / 'anchor' / FINAL_CHECKPOINT} --out_dir {run_dir}`")
            path.write_text(header + ".\n" + path.read_text())
        paths.append(path)
    return paths


def run_pipeline(config_path: str | Path, run_dir: str | Path | None = None, evaluate: bool = True,
                 overrides: list[str] | None = None, data_root: str | None = None,
                 stages: tuple[str, ...] = STAGES) -> Path:
    """Run the stages of a pipeline config (all by default; ``("anchor",)``: the anchor and its affinity);
    return the run directory."""
    config = load_pipeline_config(config_path, overrides, data_root)
    run_dir = Path(run_dir or config.get("run_dir") or Path("runs") / Path(config_path).stem).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_yaml(config, run_dir / "configs" / "pipeline.yaml")

    run_stage("anchor", stage_config(config, "anchor", run_dir), run_dir)
    if not (run_dir / "affinity.json").is_file():
        from stages.affinity import compute_affinity

        affinity_cfg = config.get("affinity") or {}
        print("[dymu run] affinity: computing RSA task affinity from the anchor")
        aff = compute_affinity(run_dir / "anchor" / FINAL_CHECKPOINT, build_data(config["data"]), run_dir,
                               num_images=int(affinity_cfg.get("num_images", 100)),
                               seed=int(affinity_cfg.get("seed", 0)))
        print(f"[dymu run] affinity:\n{aff.numpy().round(3)}")
    if "edge" not in stages:
        return run_dir
    run_stage("edge", stage_config(config, "edge", run_dir), run_dir)
    if "weight" not in stages:
        return run_dir
    run_stage("weight", stage_config(config, "weight", run_dir), run_dir)
    if evaluate:
        from stages.evaluate import evaluate_run

        evaluate_run(run_dir, **(config.get("evaluate") or {}))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline config (e.g. configs/quickstart.yaml)")
    parser.add_argument("--run_dir", default=None, help="run directory (default: the config's run_dir, "
                        "else runs/<config name>)")
    parser.add_argument("--no_evaluate", action="store_true", help="stop after the weight stage")
    parser.add_argument("--data_root", default=None, help="the data set's root (sets data.init_args.root)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config entry, e.g. --set anchor.trainer.devices=4 (repeatable)")
    args = parser.parse_args(argv)
    try:
        run_dir = run_pipeline(args.config, args.run_dir, evaluate=not args.no_evaluate,
                               overrides=args.overrides, data_root=args.data_root)
    except (StageFailed, ValueError, FileNotFoundError) as err:
        print(f"[dymu run] error: {err}", file=sys.stderr)
        return 1
    print(f"[dymu run] done: {run_dir}")
    return 0


def configs_main(argv: list[str] | None = None) -> int:
    """``dymu configs``: write the per-stage LightningCLI configs of a pipeline config."""
    parser = argparse.ArgumentParser(prog="dymu configs", description=write_stage_configs.__doc__)
    parser.add_argument("--config", required=True, help="pipeline config")
    parser.add_argument("--out", required=True, help="folder for anchor.yaml, edge.yaml, weight.yaml")
    parser.add_argument("--run_dir", required=True, help="run directory the stage configs point at")
    parser.add_argument("--data_root", default=None, help="the data set's root (sets data.init_args.root)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    args = parser.parse_args(argv)
    config = load_pipeline_config(args.config, args.overrides, args.data_root)
    for path in write_stage_configs(config, args.out, args.run_dir, source=args.config):
        print(path)
    return 0
