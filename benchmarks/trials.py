"""The ``trials`` rows of ``benchmarks/run.py``: K sweep trials of a hypernet stage batched in one process
(``dymu.batched_trials``) against the same K trials' steps one after another, K = 1, 6, 24 (issue 20).

Each trial has its own hypernet, settings (tau, lambdas, temperature, seed), batch and Adam, as in a sweep; the
frozen anchor is shared. A "separate" step is what K single-trial processes do one after another: for each trial
``dymu.training.edge_search_loss`` (or ``weight_adaptation_loss``) on its own batch, backward, its own Adam step.
A "batched" step is ``BatchedEdgeTrials.step`` (``BatchedWeightTrials.step``) over the K batches. The two run
interleaved, round by round, so the ratio is paired.

The rows run in a child process (``python -m benchmarks.trials``), so that the allocator setting of the
``malloc kept`` rows (``dymu.batched_trials.retain_freed_memory``) cannot change any other row's measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.measure import interleaved_times, median_ms, peak_memory_mb  # noqa: E402
from benchmarks.networks import NETWORKS, Network, Size, build_model, edge_settings, make_datamodule  # noqa: E402
from dymu.batched_trials import (  # noqa: E402
    AdamSettings,
    BatchedEdgeTrials,
    BatchedWeightTrials,
    EdgeTrial,
    WeightTrial,
    gumbel_noise,
    noise_generator,
    retain_freed_memory,
)
from dymu.training import edge_search_loss, weight_adaptation_loss  # noqa: E402

TRIAL_COUNTS = (1, 6, 24)
KEPT_K = 6  # the K of the rows measured again with the freed memory kept
TRIAL_ROWS = [(row, f"{how} K={k}") for row in ("trials_edge_step", "trials_weight_step") for k in TRIAL_COUNTS
              for how in ("separate", "batched")] + \
             [("trials_edge_step", f"{how} K={KEPT_K}, malloc kept") for how in ("separate", "batched")]


def stage_batch_size(config: dict[str, Any], stage: str, default: int) -> int:
    """The stage's batch size (``<stage>.data.batch_size``, else the data module's, else ``default``)."""
    section = (config.get(stage) or {}).get("data") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    return int(section.get("batch_size", data.get("batch_size", default)))


def optimizer_settings(config: dict[str, Any], stage: str) -> AdamSettings:
    return AdamSettings.from_spec(((config.get(stage) or {}).get("model") or {}).get("optimizer"))


def edge_trials(config: dict[str, Any], n_tasks: int, k: int) -> list[EdgeTrial]:
    """K trials of the config's edge stage as a sweep varies them: tau, the lambdas and the seed per trial."""
    model = (config.get("edge") or {}).get("model") or {}
    _, reg, groups = edge_settings(config, n_tasks)
    opt = optimizer_settings(config, "edge")
    return [EdgeTrial(seed=i, tau=reg["tau"] * (0.75 + 0.5 * i / max(1, k - 1)),
                      lambda_active=reg["lambda_active"] * (1 + i % 3), lambda_inactive=reg["lambda_inactive"],
                      temperature=float(model.get("temperature", 5.0)),
                      temperature_decay=float(model.get("temperature_decay", 0.97)),
                      dirichlet_eta=float(model.get("dirichlet_eta", 0.2)), preference_groups=groups,
                      layer_weighting=reg["layer_weighting"], optimizer=opt) for i in range(k)]


def split(batch: dict[str, Tensor], size: int, k: int) -> list[dict[str, Tensor]]:
    return [{key: v[i * size:(i + 1) * size] for key, v in batch.items()} for i in range(k)]


def edge_candidates(model: Any, tasks: list[Any], config: dict[str, Any], batches: list[dict[str, Tensor]],
                    total_steps: int) -> tuple[Callable[[], None], Callable[[], None], str]:
    k = len(batches)
    anchor = model.anchor.eval().requires_grad_(False)
    n, n_layers = model.n_tasks, anchor.n_layers
    device = batches[0]["image"].device
    affinity = torch.full((n, n), 0.5, device=device).fill_diagonal_(1.0)
    scales = torch.tensor([t.scale for t in tasks], device=device)
    trials = edge_trials(config, n, k)
    nets = [copy.deepcopy(model.edge_hypernet).requires_grad_(True) for _ in range(k)]
    for i, net in enumerate(nets):  # each trial its own hypernet
        torch.manual_seed(10 + i)
        for head in net.heads:
            torch.nn.init.normal_(head.weight, std=1.0)
    batched = BatchedEdgeTrials(anchor, [copy.deepcopy(h) for h in nets], trials, tasks, affinity, scales,
                                total_steps)
    opts = [torch.optim.Adam(h.parameters(), lr=t.optimizer.lr, betas=t.optimizer.betas, eps=t.optimizer.eps,
                             weight_decay=t.optimizer.weight_decay) for h, t in zip(nets, trials)]
    step = {"n": 0}

    def separate() -> None:
        s = step["n"]
        for net, opt, trial, batch in zip(nets, opts, trials, batches):
            opt.zero_grad(set_to_none=True)
            noise = gumbel_noise((trial.preference_groups, n_layers, n, n), noise_generator(trial.seed, s, device),
                                 device)
            out = edge_search_loss(anchor, net, tasks, scales, batch, trial.preferences(n, s),
                                   trial.temperature_at(s, total_steps), affinity, trial.regularizer(n), noise=noise)
            out["loss"].backward()
            opt.step()
        step["n"] += 1

    def together() -> None:
        batched.step(batches)

    note = f"{trials[0].preference_groups} preference group(s), batch {batches[0]['image'].shape[0]} per trial"
    return separate, together, note


def weight_candidates(model: Any, tasks: list[Any], config: dict[str, Any], batches: list[dict[str, Tensor]]
                      ) -> tuple[Callable[[], None], Callable[[], None], str]:
    k = len(batches)
    anchor = model.anchor.eval().requires_grad_(False)
    n = model.n_tasks
    device = batches[0]["image"].device
    scales = torch.tensor([t.scale for t in tasks], device=device)
    groups = int(((config.get("weight") or {}).get("model") or {}).get("preference_groups", 1))
    opt = optimizer_settings(config, "weight")
    trials = [WeightTrial(seed=i, preference_groups=groups, optimizer=opt) for i in range(k)]
    models = []
    for i in range(k):  # each trial its own edge hypernet (its own trees) and weight hypernet
        edge = copy.deepcopy(model.edge_hypernet).requires_grad_(False)
        torch.manual_seed(20 + i)
        for head in edge.heads:
            torch.nn.init.normal_(head.weight, std=1.0)
        m = type(model)(anchor, edge, copy.deepcopy(model.weight_hypernet).requires_grad_(True), model.input_shape)
        models.append(m)
    batched = BatchedWeightTrials(anchor, [copy.deepcopy(m.weight_hypernet) for m in models],
                                  [m.architecture for m in models], trials, tasks, scales)
    opts = [torch.optim.Adam(m.weight_hypernet.parameters(), lr=t.optimizer.lr, betas=t.optimizer.betas,
                             eps=t.optimizer.eps, weight_decay=t.optimizer.weight_decay) for m, t in zip(models, trials)]
    step = {"n": 0}

    def separate() -> None:
        s = step["n"]
        for m, o, trial, batch in zip(models, opts, trials, batches):
            o.zero_grad(set_to_none=True)
            weight_adaptation_loss(m, tasks, scales, batch, trial.preferences(n, s))["loss"].backward()
            o.step()
        step["n"] += 1

    def together() -> None:
        batched.step(batches)

    note = f"{groups} preference group(s), batch {batches[0]['image'].shape[0]} per trial"
    return separate, together, note


def measure(net: Network, quick: bool, device: torch.device, kept: bool) -> list[dict[str, Any]]:
    """The rows of one network (plain dicts: row, variant, times in s, the separate times, note, extra)."""
    if kept:
        retain_freed_memory()
    config = net.read_config(quick)
    size = net.quick if quick else net.bench
    counts = (KEPT_K,) if kept else TRIAL_COUNTS
    warmup, repeats = (0, 1) if quick else (1, 5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dymu-trials-") as folder:
        for stage in ("edge",) if kept else ("edge", "weight"):
            per_trial = min(stage_batch_size(config, stage, size.batch), size.batch) if quick else \
                stage_batch_size(config, stage, size.batch)
            dm = make_datamodule(net, config, Size(size.crop, per_trial * max(counts)), Path(folder) / stage)
            dm.setup("fit")
            batch = next(iter(dm.train_dataloader()))
            batch = {key: v.to(device) for key, v in batch.items() if isinstance(v, Tensor)}
            edge_args, _, _ = edge_settings(config, len(dm.tasks))
            model = build_model(config, dm.tasks, dm.input_shape, edge_args).to(device)
            for k in counts:
                batches = split(batch, per_trial, k)
                if stage == "edge":
                    separate, together, note = edge_candidates(model, dm.tasks, config, batches, 1000)
                else:
                    separate, together, note = weight_candidates(model, dm.tasks, config, batches)
                separate()  # the first calls allocate the optimizers' state
                together()
                t = interleaved_times({"separate": separate, "batched": together}, warmup, repeats, device)
                suffix = ", malloc kept" if kept else ""
                speedup = float(np.median([a / b for a, b in zip(t["separate"], t["batched"])]))
                for how, fn in (("separate", separate), ("batched", together)):
                    ms = median_ms(t[how])
                    rows.append({"row": f"trials_{stage}_step", "variant": f"{how} K={k}{suffix}", "times": t[how],
                                 "peak": list(peak_memory_mb(fn, device)),
                                 "ref_times": t["separate"] if how == "batched" else None,
                                 "vs": [f"trials_{stage}_step", f"separate K={k}{suffix}"] if how == "batched" else None,
                                 "note": (f"{1e3 * k / ms:.1f} trials/s; {note}" if how == "separate" else
                                          f"{1e3 * k / ms:.1f} trials/s, {speedup:.2f}x the separate steps' throughput "
                                          "(paired)"),
                                 "extra": {"trials": k, "trials_per_s": 1e3 * k / ms, "ms_per_trial_step": ms / k,
                                           **({"throughput_ratio": speedup} if how == "batched" else {})}})
    return rows


def measure_in_child(net: Network, quick: bool, device: torch.device, kept: bool) -> list[dict[str, Any]]:
    """``measure`` in a fresh process (``python -m benchmarks.trials``), its rows back as JSON."""
    with tempfile.TemporaryDirectory(prefix="dymu-trials-out-") as folder:
        out = Path(folder) / "rows.json"
        command = [sys.executable, "-m", "benchmarks.trials", "--network", net.name, "--device", str(device),
                   "--out", str(out), "--threads", str(torch.get_num_threads())]
        command += ["--quick"] if quick else []
        command += ["--kept"] if kept else []
        subprocess.run(command, cwd=ROOT, check=True)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the trials rows of one network (run by benchmarks/run.py)")
    parser.add_argument("--network", required=True, choices=[n.name for n in NETWORKS])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kept", action="store_true", help="retain_freed_memory() first")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    net = next(n for n in NETWORKS if n.name == args.network)
    rows = measure(net, args.quick, torch.device(args.device), args.kept)
    Path(args.out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
