"""The figures of ``dymu evaluate``: resource usage over the task simplex (the paper's figure 5) and marginal
controllability of each task's loss by its own preference (the paper's figure 7).

Every plotting function takes the model or ``evaluate_run``'s result (``stages.results.EvaluationResult`` or its
JSON dict) and an output path, writes one PNG and returns its path. Records are found by their typed fields
(``Method``, ``adaptation``, ``c``); the labels drawn come from ``stages.results``' renderers. The numbers they
draw come from functions of their own (:func:`simplex_usage`, :func:`edge_usage`, :func:`marginal_series`) so
that they can be checked without reading images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.tri import Triangulation

from dymu.controller import enumerable
from dymu.model import DynamicMultiTaskModel
from dymu.preference import Preference
from dymu.search_space import Architecture
from stages.results import (
    CompareRow,
    EvaluationRecord,
    EvaluationResult,
    Method,
    compare_label,
    method_label,
    parse_all,
)

PLOT_FILES = {"resource_usage": "resource_usage.png", "marginal_controllability": "marginal_controllability.png",
              "trees": "trees.png", "cost_accuracy": "cost_accuracy.png"}
"""File names of the figures ``write_plots`` puts beside ``report.md``."""

RESOURCE_CS = (0.0, 0.5, 1.0)
"""Budgets ``c`` of the resource-usage panels."""

MAX_PAIRS = 10
"""Most simplex edges (task pairs) drawn when N != 3."""

MAX_PANELS = 20
"""Most task panels of the marginal-controllability figure."""

TRIANGLE_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])
"""Cartesian positions of the corners ``e_0, e_1, e_2`` of the N = 3 simplex."""


def anchor_params(model: DynamicMultiTaskModel) -> int:
    """Parameters of the single-task anchor (N separate networks and their heads)."""
    return model.node_costs().cost(Architecture.anchor(model.n_tasks, model.anchor.n_layers))["params"]


def used_fractions(model: DynamicMultiTaskModel, rs: np.ndarray, c: float) -> np.ndarray:
    """Used-parameter fraction ``model.cost(r, c)["params"] / anchor params`` of each row of ``rs``.

    Args:
        model: the dynamic model (with or without an edge hypernet).
        rs: ``(M, N)`` non-negative task weights; each row is normalised to sum to 1.
        c: the compute budget in [0, 1].

    Returns:
        ``(M,)`` float64 fractions.
    """
    total = anchor_params(model)
    costs = model.node_costs()
    cache: dict[Architecture, int] = {}
    out = np.empty(len(rs), dtype=np.float64)
    for i, r in enumerate(np.asarray(rs, dtype=np.float64)):
        arch = model.architecture(Preference.create(r, c, normalize=True))
        if arch not in cache:
            cache[arch] = costs.cost(arch)["params"]
        out[i] = cache[arch] / total
    return out


def simplex_grid(n_tasks: int, resolution: int) -> np.ndarray:
    """The barycentric lattice ``{k / resolution : k in N^n, sum(k) = resolution}`` of the simplex.

    Args:
        n_tasks: the simplex's dimension plus one.
        resolution: lattice steps along each edge (>= 1); ``C(resolution + n - 1, n - 1)`` points, e.g.
            496 for N = 3 and resolution 30.

    Returns:
        ``(M, n_tasks)`` float64 points, corners included.
    """
    if n_tasks < 1 or resolution < 1:
        raise ValueError(f"simplex_grid needs n_tasks >= 1 and resolution >= 1 (got {n_tasks}, {resolution})")
    points = [(*head, resolution - sum(head)) for head in itertools.product(range(resolution + 1), repeat=n_tasks - 1)
              if sum(head) <= resolution]
    return np.array(points, dtype=np.float64).reshape(-1, n_tasks) / resolution


def simplex_usage(model: DynamicMultiTaskModel, c: float, resolution: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Used-parameter fractions on the whole simplex lattice (:func:`simplex_grid`) at budget ``c``.

    Returns:
        ``(r, fraction)``: ``(M, N)`` preferences and their ``(M,)`` fractions of the anchor's parameters.
    """
    rs = simplex_grid(model.n_tasks, resolution)
    return rs, used_fractions(model, rs, c)


def edge_pairs(n_tasks: int, max_pairs: int = MAX_PAIRS) -> list[tuple[int, int]]:
    """The first ``max_pairs`` task pairs ``(i, j)``, ``i < j``, in lexicographic order."""
    return list(itertools.combinations(range(n_tasks), 2))[:max_pairs]


def edge_usage(model: DynamicMultiTaskModel, c: float, points: int = 41, max_pairs: int = MAX_PAIRS
               ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Used-parameter fractions along the simplex's edges ``r = t e_i + (1 - t) e_j`` at budget ``c``.

    Args:
        model: the dynamic model (N >= 2).
        c: the compute budget.
        points: values of ``t``, evenly spaced over [0, 1] (ends included).
        max_pairs: most edges (:func:`edge_pairs`).

    Returns:
        ``(pairs, t, fraction)``: the pairs, ``(T,)`` values of ``t`` and ``(P, T)`` fractions.
    """
    n = model.n_tasks
    pairs = edge_pairs(n, max_pairs)
    t = np.linspace(0.0, 1.0, points)
    fractions = np.empty((len(pairs), points), dtype=np.float64)
    for p, (i, j) in enumerate(pairs):
        rs = np.zeros((points, n))
        rs[:, i], rs[:, j] = t, 1.0 - t
        fractions[p] = used_fractions(model, rs, c)
    return pairs, t, fractions


def barycentric_to_cartesian(rs: np.ndarray) -> np.ndarray:
    """``(M, 3)`` barycentric points to ``(M, 2)`` positions in the triangle ``TRIANGLE_CORNERS``."""
    return np.asarray(rs, dtype=np.float64) @ TRIANGLE_CORNERS


def plot_resource_usage(model: DynamicMultiTaskModel, path: str | Path, cs: Sequence[float] = RESOURCE_CS,
                        resolution: int = 30, edge_points: int = 41) -> Path:
    """The paper's figure 5: the pruned model's fraction of the anchor's parameters over the task simplex.

    One panel per ``c``. For N = 3 a heat map over the triangle (corners labelled with the task names);
    otherwise one line per simplex edge (:func:`edge_usage`). Shared colour/value scale 0..1.

    Args:
        model: the dynamic model.
        path: the PNG to write.
        cs: budgets, one panel each.
        resolution: lattice steps along an edge of the N = 3 triangle.
        edge_points: values of ``t`` per edge for N != 3.

    Returns:
        ``path``.
    """
    path = Path(path)
    n, names = model.n_tasks, model.tasks
    fig, axes = plt.subplots(1, len(cs), figsize=(4.2 * len(cs) + (0.8 if n == 3 else 0.0), 4.0), squeeze=False,
                             layout="constrained")
    try:
        axes = axes[0]
        if n == 3:
            mappable = None
            for ax, c in zip(axes, cs):
                rs, frac = simplex_usage(model, c, resolution)
                xy = barycentric_to_cartesian(rs)
                mappable = ax.tripcolor(Triangulation(xy[:, 0], xy[:, 1]), frac, shading="gouraud", cmap="viridis",
                                        vmin=0.0, vmax=1.0)
                for corner, name, offset, align in zip(TRIANGLE_CORNERS, names, [(-0.03, -0.05), (0.03, -0.05),
                                                                                (0.0, 0.04)],
                                                       [("right", "top"), ("left", "top"), ("center", "bottom")]):
                    ax.text(corner[0] + offset[0], corner[1] + offset[1], name, ha=align[0], va=align[1], fontsize=9)
                ax.set_title(f"c = {c:g}")
                ax.set_xlim(-0.25, 1.25)
                ax.set_ylim(-0.15, 1.0)
                ax.set_aspect("equal")
                ax.axis("off")
            fig.colorbar(mappable, ax=list(axes), shrink=0.8, label="used parameters / anchor's")
        else:
            for ax, c in zip(axes, cs):
                pairs, t, frac = edge_usage(model, c, edge_points)
                for (i, j), row in zip(pairs, frac):
                    ax.plot(t, row, label=f"{names[i]} / {names[j]}")
                ax.set_title(f"c = {c:g}")
                ax.set_xlabel("t in r = t e_i + (1 - t) e_j")
                ax.set_ylim(0.0, 1.05)
                ax.grid(alpha=0.3)
            axes[0].set_ylabel("used parameters / anchor's")
            axes[-1].legend(title="i / j", fontsize=7, loc="lower right")
        fig.suptitle("Resource usage of the pruned model")
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


Result = EvaluationResult | dict[str, Any]
"""``evaluate_run``'s result, typed or its JSON dict."""


def result_part(result: Result, key: str) -> Any:
    """An entry of ``result`` by its JSON key (None where a JSON dict lacks it)."""
    return getattr(result, key) if isinstance(result, EvaluationResult) else result.get(key)


def result_records(result: Result, key: str = "records") -> list[EvaluationRecord]:
    """The typed records (``records`` or ``budget_records``) of ``result``."""
    return parse_all(result_part(result, key) or (), EvaluationRecord.from_json)


def marginal_series(result: Result, cs: Sequence[float] = (0.0, 1.0)) -> list[dict[str, Any]]:
    """Per task: its scaled test loss against its own preference ``r_t``, from ``evaluate_run``'s records.

    Args:
        result: ``evaluate_run``'s result (``tasks``, ``records``; the anchor's scaled losses are taken from
            ``result["anchor"]["losses"]``, else from the ``Method.ANCHOR`` records).
        cs: the budgets drawn.

    Returns:
        One dict per task: ``task``, ``anchor`` (its loss, or None) and ``series``, a list of dicts with
        ``c``, ``adaptation``, ``label``, ``r`` and ``loss`` (lists sorted by ``r``).
    """
    tasks = list(result_part(result, "tasks"))
    all_records = result_records(result)
    anchor = (result_part(result, "anchor") or {}).get("losses")
    if anchor is None:
        anchor_recs = [r for r in all_records if r.method is Method.ANCHOR and r.preferences]
        anchor = anchor_recs[0].preferences[0]["losses"] if anchor_recs else None
    records = [rec for rec in all_records if rec.method is Method.DYMU and rec.c in cs]
    records.sort(key=lambda rec: (rec.c, rec.adaptation))
    out = []
    for t, name in enumerate(tasks):
        series = []
        for rec in records:
            pairs = sorted((p["r"][t], p["losses"][t]) for p in rec.preferences)
            series.append({"c": rec.c, "adaptation": rec.adaptation,
                           "label": f"c={rec.c:g}, {'with' if rec.adaptation else 'no'} adaptation",
                           "r": [x for x, _ in pairs], "loss": [y for _, y in pairs]})
        out.append({"task": name, "anchor": None if anchor is None else float(anchor[t]), "series": series})
    return out


def plot_marginal_controllability(result: Result, path: str | Path, cs: Sequence[float] = (0.0, 1.0)
                                  ) -> Path:
    """The paper's figure 7: each task's scaled test loss against its own preference ``r_t``.

    One panel per task (the first ``MAX_PANELS``), one series per ``(c, adaptation)`` record of the dymu
    model, the single-task anchor's loss as a dashed horizontal line.

    Args:
        result: ``evaluate_run``'s result (see :func:`marginal_series`).
        path: the PNG to write.
        cs: the budgets drawn.

    Returns:
        ``path``.
    """
    path = Path(path)
    all_panels = marginal_series(result, cs)
    panels = all_panels[:MAX_PANELS]
    cols = min(len(panels), 5)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.8), squeeze=False, layout="constrained")
    colours = {c: f"C{k}" for k, c in enumerate(cs)}
    try:
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, panel in zip(axes.flat, panels):
            for s in panel["series"]:
                ax.plot(s["r"], s["loss"], color=colours.get(s["c"], "C7"), marker="s" if s["adaptation"] else "o",
                        markersize=3.5, linestyle="--" if s["adaptation"] else "-", linewidth=1.0, label=s["label"])
            if panel["anchor"] is not None:
                ax.axhline(panel["anchor"], color="k", linestyle=(0, (4, 3)), linewidth=1.0,
                           label=method_label(Method.ANCHOR))
            ax.set_title(panel["task"])
            ax.set_xlabel(f"r_{panel['task']}")
            ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel("scaled test loss")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8)
        shown = f" (the first {len(panels)} of {len(all_panels)} tasks)" if len(panels) < len(all_panels) else ""
        fig.suptitle(f"Marginal controllability: each task's loss against its own preference{shown}")
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def cost_accuracy_points(result: Result, baselines: Sequence[CompareRow | dict[str, Any]] = ()
                         ) -> list[dict[str, Any]]:
    """The points of ``cost_accuracy.png``: each method's mean parameters over the anchor's and its hypervolume
    over the anchor's (dymu at c = 0 and 1, dymu within each budget, the anchor, the baselines of
    ``dymu compare`` when given: its rows, typed or as JSON)."""
    anchor = result_part(result, "anchor")["params"]
    points = [{"label": method_label(Method.ANCHOR), "series": "anchor", "params": 1.0, "hv": 1.0}]
    for rec in result_records(result):
        if rec.method is Method.DYMU and rec.hypervolume_ratio is not None:
            points.append({"label": f"{method_label(rec.method)} c={rec.c:g}",
                           "series": f"dymu{' adapted' if rec.adaptation else ''}",
                           "params": rec.mean_params / anchor, "hv": rec.hypervolume_ratio})
    for rec in result_records(result, "budget_records"):
        if rec.hypervolume_ratio is not None:
            points.append({"label": f"B={rec.budget:g}", "series": f"budget{' adapted' if rec.adaptation else ''}",
                           "params": rec.mean_params / anchor, "hv": rec.hypervolume_ratio})
    for row in parse_all(baselines, CompareRow.from_json):
        points.append({"label": compare_label(row), "series": "baseline", "params": row.params / anchor,
                       "hv": row.hv_ratio})
    return points


def plot_cost_accuracy(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Hypervolume over the anchor's against mean parameters over the anchor's (``cost_accuracy_points``)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = {"anchor": ("k", "*"), "dymu": ("tab:blue", "o"), "dymu adapted": ("tab:orange", "o"),
              "budget": ("tab:blue", "s"), "budget adapted": ("tab:orange", "s"), "baseline": ("tab:green", "^")}
    for series, (color, marker) in styles.items():
        pts = sorted((p for p in points if p["series"] == series), key=lambda p: p["params"])
        if not pts:
            continue
        line = "-" if series.startswith("budget") else "none"
        ax.plot([p["params"] for p in pts], [p["hv"] for p in pts], color=color, marker=marker, linestyle=line,
                label=series)
        for p in pts:
            ax.annotate(p["label"], (p["params"], p["hv"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean parameters / anchor's")
    ax.set_ylabel("hypervolume / anchor's")
    ax.set_title("accuracy against cost (c = 0 unless labelled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_tree_grid(model: DynamicMultiTaskModel, path: str | Path) -> Path:
    """The trees of the uniform and one-hot preferences at c = 0, 0.5, 1 (the paper's figures 16-17), drawn as
    ``dymu show --grid`` draws them."""
    from dymu.treeview import draw_tree_grid, tree_drawing
    from stages.serve import GRID_C, grid_preferences

    anchor = model.node_costs().cost(Architecture.anchor(model.n_tasks, model.anchor.n_layers))
    cells = []
    for name, r in grid_preferences(model.n_tasks):
        label = name if not name.startswith("one-hot") else f"only {model.tasks[int(name.split()[1])]}"
        row = []
        for c in GRID_C:
            arch = model.architecture(r, c)
            cost = model.node_costs().cost(arch)
            fractions = f"params {cost['params'] / anchor['params']:.2f}, GFLOPs {cost['flops'] / anchor['flops']:.2f}"
            row.append((tree_drawing(arch, model.tasks), f"{label}, c = {c:g}\n{fractions} of the anchor"))
        cells.append(row)
    draw_tree_grid(cells, path, "trees of the uniform and one-hot preferences")
    return Path(path)


def write_plots(model: DynamicMultiTaskModel, result: Result, out_dir: str | Path,
                baselines: Sequence[CompareRow | dict[str, Any]] = ()) -> dict[str, str]:
    """Write the figures of ``PLOT_FILES`` into ``out_dir`` (``cost_accuracy`` when ``result`` has budget
    records); returns their file names by figure."""
    out_dir = Path(out_dir)
    searched = model.controller is not None and model.controller.search != "exact" and not enumerable(
        model.n_tasks, model.anchor.n_layers)
    # a tree of a space too large to enumerate is a local search (about 0.3 s for 6 tasks): fewer points per edge
    plot_resource_usage(model, out_dir / PLOT_FILES["resource_usage"], edge_points=11 if searched else 41)
    plot_marginal_controllability(result, out_dir / PLOT_FILES["marginal_controllability"])
    plot_tree_grid(model, out_dir / PLOT_FILES["trees"])
    files = {k: v for k, v in PLOT_FILES.items() if k != "cost_accuracy"}
    if result_part(result, "budget_records"):
        plot_cost_accuracy(cost_accuracy_points(result, baselines), out_dir / PLOT_FILES["cost_accuracy"])
        files["cost_accuracy"] = PLOT_FILES["cost_accuracy"]
    return files
