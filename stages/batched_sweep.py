"""``dymu sweep --batch_trials K``: a sweep's trials trained K at a time in one process (issue 20, item 1).

Trials that share everything but the settings a batched step can hold per trial (below) are grouped, at most K
to a group, in the sweep's order. A group trains its edge stage (``search: gumbel``) with
``dymu.batched_trials.BatchedEdgeTrials`` and then its weight stage with ``BatchedWeightTrials``: the K hypernets
stacked, one frozen anchor (the parent run's) computing every trial's batch, one ``StackedAdam`` step per step.
Each trial then gets, in its own folder, what a trial run alone writes: ``pipeline.yaml`` and
``configs/<stage>.yaml``, ``<stage>/final.ckpt`` with the stage's metadata (``checkpoint_metadata`` of the trial's
own stage module) and lineage record (so a rerun skips it and ``dymu run``'s lineage checks accept it), the
evaluation and ``trial.json``.

Every trial of a batched sweep runs with ``seeded_sampling: true`` in both stages (recorded in its configs): its
Gumbel noise and its batches' order come from generators seeded by the trial's seed and the step or epoch, not
from the global random state, so a trial trained in a group equals the same trial trained alone with that
option (``tests/test_batched_sweep.py``). Each trial's modules are built by the stage's own LightningCLI from the
trial's stage config, seeded as a run alone is, so every trial starts from the hypernets a run alone starts from.

Per trial (``BATCHABLE``): ``seed_everything`` and the stages' ``seed``, ``tau``, the lambdas, the temperature
schedule, ``dirichlet_eta``, the regularizer's switches, ``straight_through``, ``loss_scales``, Adam's ``lr``,
``betas``, ``eps`` and ``weight_decay``, ``val_preferences``. Everything else (data, trainer, hypernet sizes,
``preference_groups``, ``bn_statistics``, ...) must be equal within a group: trials that differ there form
separate groups.

What is not batched runs alone, one by one as ``dymu sweep`` runs every trial without the option, after a printed
note with the reason (``batch_problem``): ``search: measured``, an LR scheduler, an optimizer other than Adam (or
Adam's ``amsgrad`` and the like), trainer settings the plain loop does not reproduce (``max_epochs``,
``accumulate_grad_batches``, gradient clipping, several devices, a precision other than 32), augmented training
data (its random crops and flips come from the global random state), or a stage that has a checkpoint to
resume from (a run alone resumes it; a group starts its stages at step 0).

A group does not validate during training (the validation metrics do not change what trains) and logs no W&B
run; each trial's stage folder gets ``train_log.csv``, the training values every ``log_every_n_steps`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dymu.layout import RunLayout, checkpoint_problem
from stages.common import write_yaml

if TYPE_CHECKING:
    from stages.pipeline import PipelineConfig

SEEDED = ("edge.model.seeded_sampling=true", "weight.model.seeded_sampling=true")
"""The overrides every trial of a batched sweep runs with (before the trial's own parameters)."""
STAGES_BATCHED = ("edge", "weight")
BATCHABLE = {
    "edge": ("seed", "tau", "lambda_active", "lambda_inactive", "temperature", "temperature_decay",
             "temperature_every", "dirichlet_eta", "layer_weighting", "use_affinity", "task_dichotomy", "use_inactive",
             "straight_through", "loss_scales", "optimizer", "val_preferences"),
    "weight": ("seed", "dirichlet_eta", "loss_scales", "optimizer", "val_preferences"),
}
"""The model arguments that may differ between the trials of one group (besides ``seed_everything``)."""
PER_TRIAL_INPUTS = {"weight": ("edge_checkpoint",)}
"""Model arguments that name the trial's own files (its own edge checkpoint): differ by construction."""
TRAINER_KEYS = ("max_steps", "max_epochs", "val_check_interval", "check_val_every_n_epoch", "accelerator", "devices",
                "precision", "default_root_dir", "logger", "log_every_n_steps", "enable_progress_bar",
                "enable_model_summary", "enable_checkpointing", "num_sanity_val_steps", "limit_val_batches",
                "deterministic", "benchmark")
"""The trainer settings a batched stage accepts (those that do not change the training steps, and the step
budget); any other runs the trial alone."""


@dataclass
class PendingTrial:
    """A trial of the sweep's plan that has no ``trial.json`` yet."""

    index: int
    name: str
    params: dict[str, Any]
    config: PipelineConfig
    configs: dict[str, dict[str, Any]]  # folder -> the stage's full LightningCLI config
    layout: RunLayout


# --- what can be batched ----------------------------------------------------------------------------------------

def batch_problem(trial: PendingTrial) -> str | None:
    """Why ``trial`` cannot train in a group (None when it can)."""
    from dymu.batched_trials import AdamSettings
    from stages.common import build_data

    for stage in STAGES_BATCHED:
        config = trial.configs[stage]
        model, trainer = config.get("model") or {}, config.get("trainer") or {}
        if not model.get("seeded_sampling"):
            return f"{stage}.model.seeded_sampling is false"
        if stage == "edge" and model.get("search", "gumbel") != "gumbel":
            return f"edge.model.search is {model.get('search')!r} (only the Gumbel search is batched)"
        if model.get("lr_scheduler") is not None:
            return f"{stage}.model.lr_scheduler is set (schedulers are not batched)"
        spec = model.get("optimizer")
        try:
            AdamSettings.from_spec({"class_path": spec} if isinstance(spec, str) else spec)
        except ValueError as err:
            return f"{stage}.model.optimizer: {err}"
        other = sorted(set(trainer) - set(TRAINER_KEYS))
        if other:
            return f"{stage}.trainer sets {', '.join(other)} (a batched stage reproduces plain steps only)"
        if not isinstance(trainer.get("max_steps"), int) or trainer["max_steps"] < 1:
            return f"{stage}.trainer.max_steps is not set (a batched stage needs the step budget)"
        if trainer.get("max_epochs") not in (None, -1):
            return f"{stage}.trainer.max_epochs is set (a batched stage counts steps only)"
        if str(trainer.get("precision", "32")) not in ("32", "32-true"):
            return f"{stage}.trainer.precision is {trainer['precision']} (batched stages run in float32)"
        if trainer.get("devices", 1) not in (1, "1", [0], "auto") or (
                trainer.get("devices") == "auto" and _device(trainer).type == "cuda"
                and torch.cuda.device_count() > 1):
            return f"{stage}.trainer.devices is {trainer.get('devices')!r} (a batched stage runs on one device)"
        if trial.layout.started(stage) and not trial.layout.final(stage).is_file():
            return f"its {stage} stage has a checkpoint to resume from"
    data = build_data(trial.configs["edge"]["data"])
    if getattr(data, "augmented", True) and getattr(data, "augment", True):
        return ("its training data is augmented (the random crops and flips come from the global random state, "
                "which a group's trials share)")
    return None


def group_key(trial: PendingTrial) -> str:
    """What the trials of one group share: the stage configs without the per-trial settings and paths."""
    shared = {}
    for stage in STAGES_BATCHED:
        config = copy.deepcopy(trial.configs[stage])
        config.pop("seed_everything", None)
        config.pop("checkpoint", None)
        trainer = config.get("trainer") or {}
        for key in ("default_root_dir", "logger"):
            trainer.pop(key, None)
        model = config.get("model") or {}
        for key in (*BATCHABLE[stage], *PER_TRIAL_INPUTS.get(stage, ())):
            model.pop(key, None)
        shared[stage] = config
    return json.dumps(shared, sort_keys=True, default=str)


def plan_groups(trials: Sequence[PendingTrial], size: int
                ) -> tuple[list[list[PendingTrial]], list[tuple[PendingTrial, str]]]:
    """The groups (at most ``size`` trials, in plan order, each of one ``group_key``) and the trials that run
    alone with the reason."""
    alone: list[tuple[PendingTrial, str]] = []
    by_key: dict[str, list[PendingTrial]] = {}
    for trial in trials:
        problem = batch_problem(trial)
        if problem is not None:
            alone.append((trial, problem))
        else:
            by_key.setdefault(group_key(trial), []).append(trial)
    groups = [members[i:i + size] for members in by_key.values() for i in range(0, len(members), size)]
    return sorted(groups, key=lambda g: g[0].index), alone


# --- one group --------------------------------------------------------------------------------------------------

def _device(trainer: dict[str, Any]) -> torch.device:
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


class _OneProcess:
    """The strategy ``anchor_loss_scales`` reduces through: one process, nothing to add."""

    @staticmethod
    def reduce(value: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        return value


def build_stage(stage: str, config: dict[str, Any]) -> Any:
    """The stage's LightningCLI built from ``config`` without running (seeded by ``seed_everything`` first, as a
    run alone is, so the module's fresh hypernet is the one a run alone starts from)."""
    from stages.stage_cli import stage_main

    return stage_main(stage, copy.deepcopy(config), run=False)


def adam_settings(module: Any) -> Any:
    """The trial's Adam, read from the optimizer its own stage builds (``configure_optimizers``)."""
    from dymu.batched_trials import AdamSettings

    optimizer = module.optimizer_factory(module.optimizer_parameters())
    group = optimizer.param_groups[0]
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1 or any(
            group.get(flag) for flag in ("amsgrad", "maximize", "decoupled_weight_decay")):
        raise ValueError(f"the {module.stage_name} stage's optimizer is not a plain Adam: it cannot be batched")
    return AdamSettings(float(group["lr"]), (float(group["betas"][0]), float(group["betas"][1])),
                        float(group["eps"]), float(group["weight_decay"])), optimizer


def batch_stream(loader: Any, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """A trial's training batches over epochs, each epoch's order seeded as ``seeded_sampling`` seeds it."""
    from dymu.batched_trials import seed_batch_order

    epoch = 0
    while True:
        if not seed_batch_order(loader, seed, epoch):
            raise ValueError("the training loader has no RandomSampler: its order cannot be seeded")
        yield from loader
        epoch += 1


def stage_finished(layout: RunLayout, folder: str, config: dict[str, Any]) -> bool:
    """Whether a trial's stage has its finished checkpoint, of this config and from its present parents (as
    ``run_stage`` checks before skipping; a stale folder is set aside and the stage is trained again)."""
    from stages.graph import STAGES
    from stages.lineage import expected_lineage
    from stages.runner import check_lineage, different_config_error, same_config

    spec = STAGES[folder]
    if layout.started(folder):
        from stages.common import read_yaml

        path = layout.stage_config(folder)
        if path.is_file() and not same_config(read_yaml(path), config, folder, layout.root):
            raise different_config_error(layout, folder)
        check_lineage(layout, folder, spec, expected_lineage(folder, config, layout.root, tuple(spec.inputs)))
    final = layout.final(folder)
    if final.is_file() and checkpoint_problem(final) is None:
        print(f"[dymu sweep] {layout.root.name} {folder}: finished checkpoint {final} found, skipping")
        write_yaml(config, layout.stage_config(folder))
        return True
    return False


def train_stage_group(stage: str, trials: Sequence[PendingTrial]) -> None:
    """Train ``stage`` of ``trials`` together and write each trial's stage folder (config, ``final.ckpt``,
    ``train_log.csv``)."""
    from dymu.batched_trials import (
        BatchedEdgeTrials,
        BatchedWeightTrials,
        EdgeTrial,
        WeightTrial,
        train_trials,
    )
    from lightning_modules.base import anchor_loss_scales

    todo = [t for t in trials if not stage_finished(t.layout, stage, t.configs[stage])]
    if not todo:
        return
    print(f"[dymu sweep] {stage}: {len(todo)} trials batched in one process: {', '.join(t.name for t in todo)}")
    start = time.perf_counter()
    for t in todo:
        write_yaml(t.configs[stage], t.layout.stage_config(stage))
    clis = [build_stage(stage, t.configs[stage]) for t in todo]
    modules = [cli.model for cli in clis]
    trainer = todo[0].configs[stage]["trainer"]
    device = _device(trainer)
    steps = int(trainer["max_steps"])
    data = clis[0].datamodule  # one data config per group: one data set for every trial's loader
    data.setup("fit")
    anchor = copy.deepcopy(modules[0].model.anchor).to(device).eval().requires_grad_(False)
    calibrated = None
    for m in modules:
        if m.loss_scales == "anchor":  # the trials share the anchor and the validation set: calibrated once
            if calibrated is None:
                calibrated = anchor_loss_scales(anchor, data.val_dataloader(), m.tasks, device, _OneProcess())
            m.scales = calibrated.to(m.scales.device)
    scales = torch.stack([m.scales for m in modules]).to(device)
    settings = [adam_settings(m) for m in modules]
    part = f"{stage}_hypernet"
    nets = [getattr(m.model, part).to(device) for m in modules]
    if stage == "edge":
        trials_settings = [EdgeTrial(seed=m.seed, tau=m.tau, lambda_active=m.regularizer["lambda_active"],
                                     lambda_inactive=m.regularizer["lambda_inactive"], temperature=m.temperature0,
                                     temperature_decay=m.temperature_decay, temperature_every=m.temperature_every,
                                     dirichlet_eta=m.sampler.eta, preference_groups=m.sampler.groups,
                                     layer_weighting=m.regularizer["layer_weighting"],
                                     use_affinity=m.regularizer["use_affinity"],
                                     task_dichotomy=m.regularizer["task_dichotomy"],
                                     use_inactive=m.regularizer["use_inactive"], straight_through=m.straight_through,
                                     optimizer=s) for m, (s, _) in zip(modules, settings)]
        batched: Any = BatchedEdgeTrials(anchor, nets, trials_settings, modules[0].tasks,
                                         modules[0].affinity.to(device), scales, total_steps=steps)
    else:
        trials_settings = [WeightTrial(seed=m.seed, dirichlet_eta=m.sampler.eta, preference_groups=m.sampler.groups,
                                       optimizer=s) for m, (s, _) in zip(modules, settings)]
        batched = BatchedWeightTrials(anchor, nets, [m.model.architecture for m in modules], trials_settings,
                                      modules[0].tasks, scales, bn_statistics=modules[0].weight_args["bn_statistics"])
    streams = [batch_stream(data.train_dataloader(), m.seed) for m in modules]

    def batches() -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield [{k: v.to(device) for k, v in next(s).items()} for s in streams]

    every = max(1, int(trainer.get("log_every_n_steps") or 50))
    logs: list[list[dict[str, float]]] = [[] for _ in modules]

    def on_step(step: int, values: dict[str, torch.Tensor]) -> None:
        if step % every == 0 or step == steps:
            for k in range(len(modules)):
                row = {"step": step}
                for key, value in values.items():
                    if key == "losses":
                        row.update({f"loss_{task.name}": float(v) for task, v in zip(modules[k].tasks, value[k])})
                    elif value.ndim == 1:
                        row[key] = float(value[k])
                logs[k].append(row)

    train_trials(batched, batches(), steps, on_step)
    seconds = time.perf_counter() - start
    epochs = steps // max(1, len(data.train_dataloader()))
    for k, (t, m, net) in enumerate(zip(todo, modules, nets)):
        net.load_state_dict(batched.hypernets.state_dict_of(k))
        net.cpu()
        write_stage_checkpoint(t.layout, stage, t.configs[stage], m, clis[k].datamodule, settings[k][1],
                               batched.optimizer.state_of(k),
                               steps, epochs, seconds / len(todo), len(todo))
        write_log(t.layout.stage_dir(stage) / "train_log.csv", logs[k])
    print(f"[dymu sweep] {stage}: {len(todo)} trials x {steps} steps in {seconds:.1f} s")


def write_log(path: Path, rows: Sequence[dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_stage_checkpoint(layout: RunLayout, folder: str, config: dict[str, Any], module: Any, datamodule: Any,
                           optimizer: torch.optim.Optimizer, state: dict[str, Any], steps: int, epochs: int,
                           seconds: float, group: int) -> Path:
    """A trial's ``<folder>/final.ckpt`` as its stage writes it alone: the module's state dict, its
    ``checkpoint_metadata`` and hyperparameters (and the data module's), the lineage record ``run_stage`` hands a
    stage, the optimizer's state (``torch.optim.Adam``'s format, the trial's moments) and Lightning's ``Timer``
    state (the trial's share of the group's seconds); ``dymu_batched`` records the group. Lightning's loop state
    is left out (a group has no Lightning loop)."""
    import lightning as L
    from lightning.pytorch.callbacks import Timer

    from dymu.checkpoint import META_KEY
    from stages.graph import STAGES
    from stages.lineage import LINEAGE_KEY, expected_lineage
    from stages.stage_cli import AtomicCheckpointIO

    params = list(optimizer.param_groups[0]["params"])
    module_hparams = {}
    for obj in (module, datamodule):  # as Lightning's checkpoint connector records them
        if obj is not None and obj.hparams:
            if getattr(obj, "_hparams_name", None):
                module_hparams[obj.CHECKPOINT_HYPER_PARAMS_NAME] = obj._hparams_name
            module_hparams[obj.CHECKPOINT_HYPER_PARAMS_KEY] = dict(obj.hparams)
    state_of_data = datamodule.state_dict() if datamodule is not None else None
    if state_of_data:
        module_hparams[type(datamodule).__qualname__] = state_of_data
    with torch.no_grad():
        for i, p in enumerate(params):
            if state["steps"][i] > 0:  # Adam keeps no state for a parameter that never had a gradient
                optimizer.state[p] = {"step": torch.tensor(float(state["steps"][i])),
                                      "exp_avg": state["exp_avg"][i].detach().cpu().clone(),
                                      "exp_avg_sq": state["exp_avg_sq"][i].detach().cpu().clone()}
    lineage = expected_lineage(folder, config, layout.root, tuple(STAGES[folder].inputs))
    checkpoint = {
        "epoch": epochs, "global_step": steps, "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "callbacks": {Timer.__qualname__: {"time_elapsed": {"train": seconds, "sanity_check": 0.0, "validate": 0.0,
                                                            "test": 0.0, "predict": 0.0}}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
        **module_hparams,
        META_KEY: module.checkpoint_metadata(), LINEAGE_KEY: lineage.to_dict(),
        "dymu_batched": {"trials": group, "seconds_per_trial": seconds},
    }
    layout.stage_dir(folder).mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(checkpoint, layout.final(folder))
    return layout.final(folder)


def run_group(parent: RunLayout, trials: Sequence[PendingTrial],
              finish: Callable[[PendingTrial], dict[str, Any]]) -> list[dict[str, Any]]:
    """Train a group's edge and weight stages together, then ``finish`` each trial (its evaluation and
    ``trial.json``), holding every trial folder's lock throughout."""
    from dymu.batched_trials import retain_freed_memory
    from stages.lineage import run_lock

    retain_freed_memory()  # a K-trial step's activations reused from step to step (docs/performance.md)
    with contextlib.ExitStack() as stack:
        for t in trials:
            stack.enter_context(run_lock(t.layout.root, "trial"))
            t.config.write(t.layout.pipeline_config)
        for stage in STAGES_BATCHED:
            train_stage_group(stage, trials)
        return [finish(t) for t in trials]
