"""Task affinity by representation similarity analysis (docs/method.md, "Task affinity").

For every branching layer ``l`` and task ``t``, ``S_l(t)`` is the (K, K) cosine-similarity matrix of the
anchor's features of node ``(l, t)`` on K images. Two tasks are affine at layer ``l`` when their
similarity matrices are close: ``D_l(i, j) = ||S_l(i) - S_l(j)||_F``, each row of ``D_l`` is min-max scaled
to [0, 1], ``Aff_l = 1 - D_l_scaled`` and ``Aff`` is the mean of ``Aff_l`` over layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

ROUNDING_TOLERANCE = 1e-5
"""Distances ``D_l(i, j)`` below ``ROUNDING_TOLERANCE * K`` count as 0. ``D_l`` is at most ``2K``; rounding
float32 features moves it by about ``1e-8 K`` (5e-7 measured for a stream rescaled by 7.3, K = 100, 48-dim
features; two unrelated random streams are at 0.2 K). Without the snap, two streams equal up to rounding
would get a tiny row range that min-max scaling stretches to [0, 1]."""


def _similarity_matrix(features: Tensor) -> Tensor:
    """(K, K) cosine similarities of the K flattened feature maps in ``features`` (float64).

    An all-zero feature map has similarity 0 with every map, itself included.
    """
    flat = F.normalize(features.detach().reshape(features.shape[0], -1).to(torch.float64), dim=1)
    return flat @ flat.T


def rsa_affinity(features: Sequence[Sequence[Tensor]]) -> Tensor:
    """Task affinity matrix from the anchor's per-node features.

    Row ``i`` is scaled on its own, so ``Aff`` is not symmetric in general; ``Aff[i, j]`` says how close
    task ``j`` is to task ``i`` relative to the other tasks as seen from ``i``. The diagonal is 1. A row
    whose distances are all equal (e.g. all streams identical) scales to zeros, so its affinities are 1.
    Distances below ``ROUNDING_TOLERANCE * K`` are treated as 0 before scaling.

    Args:
        features: ``features[t][l]`` is the (K, ...) output of node ``(l, t)`` for the same K >= 2
            images, with the anchor running as N separate networks; every task has the same number of
            layers L >= 1. Feature shapes past K may differ between tasks.

    Returns:
        The (N, N) float32 affinity on the CPU, ``Aff[i, j]`` in [0, 1].

    Raises:
        ValueError: if there are no tasks or layers, tasks have different numbers of layers, or a layer's
            features do not all hold the same number K >= 2 of images.
    """
    n_tasks = len(features)
    if n_tasks == 0:
        raise ValueError("features must hold at least one task (got 0); pass features[t][l] per task t")
    n_layers = len(features[0])
    layer_counts = [len(stream) for stream in features]
    if n_layers == 0 or any(count != n_layers for count in layer_counts):
        raise ValueError(
            f"every task must have the same number L >= 1 of layers (got {layer_counts} layers per task)"
        )
    affinity = torch.zeros(n_tasks, n_tasks, dtype=torch.float64)
    for layer in range(n_layers):
        counts = [int(features[t][layer].shape[0]) for t in range(n_tasks)]
        if counts[0] < 2 or any(count != counts[0] for count in counts):
            raise ValueError(
                f"layer {layer}: every task needs features of the same K >= 2 images "
                f"(got K = {counts} per task)"
            )
        sims = torch.stack([_similarity_matrix(features[t][layer]).cpu() for t in range(n_tasks)])
        dist = torch.linalg.vector_norm(sims[:, None] - sims[None, :], dim=(-2, -1))
        dist = torch.where(dist > ROUNDING_TOLERANCE * counts[0], dist, 0.0)
        row_min = dist.min(dim=1, keepdim=True).values
        row_range = dist.max(dim=1, keepdim=True).values - row_min
        # A row with max == min has dist - row_min == 0 everywhere: dividing by 1 scales it to zeros.
        scaled = (dist - row_min) / torch.where(row_range > 0, row_range, 1.0)
        affinity += 1.0 - scaled
    return (affinity / n_layers).to(torch.float32)


def _check_names(affinity: Tensor, task_names: Sequence[str]) -> None:
    """Raises ValueError unless ``affinity`` is (N, N) with N = ``len(task_names)``."""
    n = len(task_names)
    if affinity.shape != (n, n):
        raise ValueError(
            f"affinity must have shape ({n}, {n}) for tasks {list(task_names)} (got {tuple(affinity.shape)})"
        )


def save_affinity(
    affinity: Tensor,
    task_names: Sequence[str],
    json_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str] | None = None,
) -> None:
    """Writes the affinity as JSON ``{"tasks": [...], "affinity": [[...]]}`` and optionally a heatmap.

    Parent folders are created. The heatmap (PNG, drawn without pyplot so the global backend is left
    alone) has the reference task ``i`` on rows, task ``j`` on columns and each value written in its cell.

    Args:
        affinity: (N, N) affinity.
        task_names: the N task names, in the affinity's order.
        json_path: where to write the JSON.
        png_path: where to write the heatmap, or None for none.

    Raises:
        ValueError: if the shape does not match the number of task names.
    """
    _check_names(affinity, task_names)
    values = affinity.detach().cpu().to(torch.float64).tolist()
    json_file = Path(json_path)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps({"tasks": list(task_names), "affinity": values}, indent=2) + "\n")
    if png_path is None:
        return
    n = len(task_names)
    size = 1.5 + 0.6 * n
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.subplots()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), labels=list(task_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(task_names))
    ax.set_xlabel("task j")
    ax.set_ylabel("task i (row scaled)")
    ax.set_title("RSA task affinity Aff[i, j]")
    for i in range(n):
        for j in range(n):
            color = "black" if values[i][j] > 0.5 else "white"
            ax.text(j, i, f"{values[i][j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    png_file = Path(png_path)
    png_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_file, dpi=120)


def load_affinity(json_path: str | os.PathLike[str], task_names: Sequence[str] | None = None) -> Tensor:
    """Reads an affinity written by :func:`save_affinity`.

    Args:
        json_path: the JSON file.
        task_names: if given, the tasks the caller expects, in order.

    Returns:
        The (N, N) float32 affinity.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is malformed (truncated, not JSON, not an affinity) or its task names differ from
            ``task_names``; the message names the file and says to delete it so that ``dymu run`` recomputes it.
    """
    path = Path(json_path)
    recompute = (f"delete {path} and rerun `dymu run` (or the sweep): it recomputes the affinity from the anchor "
                 "when the file is missing")
    if not path.is_file():
        raise FileNotFoundError(f"affinity file {path} does not exist: `dymu run` computes it after the anchor "
                                "stage (or `dymu affinity` by hand)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a readable affinity file (cut short or malformed JSON: {err.msg} at line "
                         f"{err.lineno}, column {err.colno}); {recompute}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a readable affinity file (not UTF-8 text); {recompute}") from None
    if not isinstance(data, dict) or "tasks" not in data or "affinity" not in data:
        raise ValueError(f"{path} is not an affinity file: it needs the keys 'tasks' and 'affinity'; {recompute}")
    stored = list(data["tasks"])
    if task_names is not None and stored != list(task_names):
        raise ValueError(
            f"the affinity in {json_path} is for tasks {stored} but the run has tasks {list(task_names)}; "
            "recompute the affinity for these tasks or fix the task order"
        )
    try:
        affinity = torch.tensor(data["affinity"], dtype=torch.float32)
        _check_names(affinity, stored)
    except (ValueError, TypeError, RuntimeError) as err:  # a ragged or non-numeric matrix, or the wrong shape
        raise ValueError(f"{path}: {' '.join(str(err).split())}; {recompute}") from None
    return affinity
