"""The tree of a preference as a user sees it: which node of every layer and stream is computed, and which
child reads another task's stream (a cross-task edge), as text and as a matplotlib figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dymu.search_space import Architecture


@dataclass(frozen=True)
class Edge:
    """Node ``(layer, parent)`` feeds child ``child`` of layer ``layer + 1`` (the head of task ``child`` when
    ``layer`` is the last block layer). ``cross``: the child is in another task's stream than its parent."""

    layer: int
    parent: int
    child: int

    @property
    def cross(self) -> bool:
        return self.parent != self.child


@dataclass(frozen=True)
class TreeDrawing:
    """What the drawing shows: ``used[k][t]`` for block ``k`` of stream ``t``, the edges into used children and
    heads, and the task names (one stream and one head per task)."""

    tasks: tuple[str, ...]
    used: tuple[tuple[bool, ...], ...]
    edges: tuple[Edge, ...]

    @property
    def n_layers(self) -> int:
        return len(self.used)

    def used_nodes(self) -> set[tuple[int, int]]:
        return {(k, t) for k, row in enumerate(self.used) for t, u in enumerate(row) if u}

    def cross_edges(self) -> list[Edge]:
        return [e for e in self.edges if e.cross]


def tree_drawing(architecture: Architecture, tasks: Sequence[str]) -> TreeDrawing:
    """The drawing's data for ``architecture`` (N = len(tasks) streams)."""
    if len(tasks) != architecture.n_tasks:
        raise ValueError(f"{len(tasks)} task names for an architecture of {architecture.n_tasks} tasks")
    used_sets = architecture.used_nodes()
    used = tuple(tuple(t in nodes for t in range(architecture.n_tasks)) for nodes in used_sets)
    edges = []
    for k in range(architecture.n_layers):
        children = sorted(used_sets[k + 1]) if k + 1 < architecture.n_layers else range(architecture.n_tasks)
        edges += [Edge(k, architecture.parents[k][j], j) for j in children]
    return TreeDrawing(tuple(tasks), used, tuple(edges))


def render_text(drawing: TreeDrawing, title: str = "") -> str:
    """One row per layer (heads on top, block 0 at the bottom), one column per task's stream: ``o`` a used node
    that reads its own stream, ``o<i`` one that reads stream ``i`` (a cross-task edge), ``.`` an unused node."""
    width = max(6, *(len(t) + 2 for t in drawing.tasks))
    parent_of = {(e.layer, e.child): e.parent for e in drawing.edges}

    def cell(text: str) -> str:
        return text.ljust(width)

    lines = [title] if title else []
    lines.append(cell("layer") + "".join(cell(t) for t in drawing.tasks).rstrip())
    heads = ["o" if parent_of[(drawing.n_layers - 1, t)] == t else f"o<{parent_of[(drawing.n_layers - 1, t)]}"
             for t in range(len(drawing.tasks))]
    lines.append(cell("heads") + "".join(cell(h) for h in heads).rstrip())
    for k in reversed(range(drawing.n_layers)):
        cells = []
        for t, is_used in enumerate(drawing.used[k]):
            parent = parent_of.get((k - 1, t), t) if k > 0 else t
            cells.append("." if not is_used else ("o" if parent == t else f"o<{parent}"))
        lines.append(cell(f"block {k}") + "".join(cell(c) for c in cells).rstrip())
    lines.append(cell("") + "input")
    used, total = len(drawing.used_nodes()), drawing.n_layers * len(drawing.tasks)
    lines.append(f"{used} of {total} block nodes used, {len(drawing.cross_edges())} cross-task edges "
                 "(o used node, o<i reads stream i, . not computed)")
    return "\n".join(lines)


def draw_tree(drawing: TreeDrawing, path: str | Path | None = None, title: str = ""):  # noqa: ANN201 - a Figure
    """The tree as a figure (written as PNG to ``path`` if given): one column per task's stream, block layers
    bottom up and the heads on top; used nodes filled, unused ones hollow and grey; edges of the tree drawn,
    cross-task edges in red. The node markers are the collections labelled ``"used"`` and ``"unused"``."""
    from matplotlib.figure import Figure

    n, depth = len(drawing.tasks), drawing.n_layers
    fig = Figure(figsize=(1.6 + 1.3 * n, 1.6 + 0.45 * (depth + 2)))
    draw_on(fig.subplots(), drawing, title)
    fig.tight_layout()
    return _saved(fig, path)


def draw_tree_grid(cells: Sequence[Sequence[tuple[TreeDrawing, str]]], path: str | Path | None = None,
                   title: str = ""):  # noqa: ANN201 - a Figure
    """Trees side by side (the paper's figures 16-17): ``cells[row][column]`` is ``(drawing, title)``."""
    from matplotlib.figure import Figure

    rows, cols = len(cells), max(len(row) for row in cells)
    n, depth = len(cells[0][0][0].tasks), cells[0][0][0].n_layers
    fig = Figure(figsize=(cols * (1.0 + 1.0 * n), rows * (1.4 + 0.35 * (depth + 2))))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, row in enumerate(cells):
        for j in range(cols):
            if j < len(row):
                draw_on(axes[i][j], *row[j], labels=j == 0)
            else:
                axes[i][j].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _saved(fig, path)


def _saved(fig, path: str | Path | None):  # noqa: ANN001, ANN202
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def draw_on(ax, drawing: TreeDrawing, title: str = "", labels: bool = True) -> None:  # noqa: ANN001
    """Draw ``drawing`` on the matplotlib axes ``ax`` (``draw_tree``'s picture)."""
    import matplotlib

    n, depth = len(drawing.tasks), drawing.n_layers
    colours = matplotlib.colormaps["tab10"]
    used = sorted(drawing.used_nodes())
    unused = [(k, t) for k in range(depth) for t in range(n) if (k, t) not in set(used)]
    for t in range(n):  # the image feeds every used layer-0 node
        if drawing.used[0][t]:
            ax.plot([(n - 1) / 2, t], [-1, 0], color="0.6", lw=1, zorder=1)
    for e in drawing.edges:
        ax.plot([e.parent, e.child], [e.layer, e.layer + 1], color="tab:red" if e.cross else "0.3",
                lw=2.2 if e.cross else 1.4, ls="--" if e.cross else "-", zorder=1)
    ax.scatter([t for _, t in unused], [k for k, _ in unused], s=60, facecolors="white", edgecolors="0.75",
               zorder=2, label="unused")
    ax.scatter([t for _, t in used], [k for k, _ in used], s=90, c=[colours(t % 10) for _, t in used],
               edgecolors="black", zorder=3, label="used")
    ax.scatter(range(n), [depth] * n, s=160, marker="s", c=[colours(t % 10) for t in range(n)], edgecolors="black",
               zorder=3, label="heads")
    ax.scatter([(n - 1) / 2], [-1], s=120, marker="D", c="0.5", zorder=3, label="input")
    ax.set_xticks(range(n), drawing.tasks, fontsize=8)
    ax.set_yticks(range(-1, depth + 1), ["input", *[f"block {k}" for k in range(depth)], "heads"] if labels else [],
                  fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(-1.6, depth + 0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    cross = len(drawing.cross_edges())
    ax.set_title(title + ("\n" if title else "") + f"{len(used)}/{depth * n} nodes, {cross} cross-task edges (red)",
                 fontsize=8)
