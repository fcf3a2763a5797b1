"""Serving one preference of a trained run: ``dymu show`` (the tree), ``dymu export`` (a folded static network as
ONNX, TorchScript or PT2, checked against PyTorch) and ``dymu predict`` (per-task outputs of images as files).

Each command takes the run directory and the preference: ``--r`` (one weight per task, summing to 1, as
``0.8 0.1 0.1`` or ``0.8,0.1,0.1``), ``--c`` in [0, 1] and optionally ``--budget`` (a fraction of the anchor's
``--budget_metric``). Images are read as the data modules feed them: 8-bit RGB, ``x / 127.5 - 1``, NCHW.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch and the model are imported where used: `dymu show|export|predict --help` is fast
    import torch
    from torch import Tensor

    from dymu.model import DynamicMultiTaskModel
    from dymu.search_space import Architecture

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
NORMALISATION = "RGB uint8 image x -> x / 127.5 - 1 (range [-1, 1]), NCHW float32"
CHANNEL_MODES = {1: ("L",), 3: ("RGB", "P")}  # PIL modes read as that many channels (palette images as RGB)


def parse_r(values: Sequence[str]) -> list[float]:
    """``--r 0.8 0.1 0.1``, ``--r 0.8,0.1,0.1`` or ``--r 1/3 1/3 1/3`` as floats (the model checks the
    simplex)."""
    from fractions import Fraction

    items = [v for value in values for v in str(value).replace(",", " ").split()]
    try:
        return [float(Fraction(v)) if "/" in v else float(v) for v in items]
    except (ValueError, ZeroDivisionError) as err:
        raise ValueError(f"--r takes one number per task (e.g. --r 0.8 0.1 0.1), got {' '.join(values)!r}") from err


def check_preference(r: Sequence[float], c: float, tasks: Sequence[str]) -> None:
    """Raise ``ValueError`` in the command line's terms when ``(r, c)`` is not a preference of a model with
    ``tasks``: one weight per task, each finite and >= 0, summing to 1; ``c`` in [0, 1]."""
    from dymu.preference import SUM_TOLERANCE

    given = " ".join(f"{v:g}" for v in r)
    if len(r) != len(tasks):
        raise ValueError(f"--r takes one weight per task: the run's model has {len(tasks)} tasks "
                         f"({', '.join(tasks)}), got {len(r)} ({given})")
    if not all(math.isfinite(v) and v >= 0 for v in r):
        raise ValueError(f"--r weights must be finite and >= 0, got {given}")
    if abs(sum(r) - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"--r must sum to 1 (a point of the task simplex), got {given} (sum {sum(r):.6g}); e.g. "
                         f"--r {' '.join(['1/' + str(len(tasks))] * len(tasks))} for the uniform preference")
    if not (math.isfinite(c) and 0.0 <= c <= 1.0):
        raise ValueError(f"--c must be a number in [0, 1] (0 most accurate, 1 most frugal), got {c:g}")


def add_preference_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--run_dir", required=required, help="a run directory written by `dymu run`")
    parser.add_argument("--r", nargs="+", required=required,
                        help="task preference, one weight per task, summing to 1")
    parser.add_argument("--c", type=float, required=required, help="cost preference in [0, 1] (1 = frugal)")
    parser.add_argument("--budget", type=float, default=None,
                        help="at most this fraction (0, 1] of the anchor's --budget_metric")
    parser.add_argument("--budget_metric", choices=["params", "flops"], default="params")


def load_run_model(run_dir: str | Path, command: str = "dymu") -> tuple[DynamicMultiTaskModel, Path]:
    """The controllable model of a finished run (one-line errors for a missing folder or stage); a run without a
    finished weight stage gives the edge stage's model and one line on stderr saying so."""
    from dymu.layout import RunLayout
    from dymu.model import DynamicMultiTaskModel, run_checkpoint

    layout = RunLayout(run_dir)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist: pass the folder that `dymu run` wrote")
    checkpoint, note = run_checkpoint(layout.root)
    if note is not None:
        print(f"{command}: warning: {note}", file=sys.stderr)
    return DynamicMultiTaskModel.from_checkpoint(checkpoint), layout.root


@dataclass
class Served:
    """A run's model at one preference: its tree, cost and the anchor's cost."""

    model: DynamicMultiTaskModel
    run_dir: Path
    r: list[float]
    c: float
    budget: float | None
    budget_metric: str
    architecture: Architecture
    cost: dict[str, int]
    anchor_cost: dict[str, int]

    @classmethod
    def load(cls, args: argparse.Namespace) -> Served:
        """The run's model at the preference of the command line."""
        model, root = load_run_model(args.run_dir, getattr(args, "command", "dymu"))
        return cls.at(model, root, parse_r(args.r), args.c, args.budget, args.budget_metric)

    @classmethod
    def at(cls, model: DynamicMultiTaskModel, run_dir: Path, r: Sequence[float], c: float, budget: float | None = None,
           budget_metric: str = "params") -> Served:
        from dymu.search_space import Architecture

        check_preference(r, c, model.tasks)
        pref = model.preference(r, c)
        arch = model.architecture(pref, budget=budget, budget_metric=budget_metric)
        costs = model.node_costs()
        anchor = Architecture.anchor(model.n_tasks, model.anchor.n_layers)
        return cls(model, run_dir, [float(v) for v in pref.r], float(pref.c), budget, budget_metric,
                   arch, costs.cost(arch), costs.cost(anchor))

    def forward_kwargs(self) -> dict[str, Any]:
        return {"budget": self.budget, "budget_metric": self.budget_metric}

    def specialize(self, fold_bn: bool = True):  # noqa: ANN201 - a LeanNet or SpecializedNet
        return self.model.specialize(self.r, self.c, fold_bn=fold_bn, **self.forward_kwargs())

    def preference_text(self) -> str:
        budget = f", budget {self.budget:g} of the anchor's {self.budget_metric}" if self.budget is not None else ""
        return f"r = ({', '.join(f'{v:.3g}' for v in self.r)}), c = {self.c:g}{budget}"

    def cost_text(self) -> str:
        p, f = self.cost["params"], self.cost["flops"] / 1e9
        return (f"{p:,} params ({p / self.anchor_cost['params']:.2f} of the anchor), {f:.4g} GFLOPs "
                f"({self.cost['flops'] / self.anchor_cost['flops']:.2f})")

    def summary(self) -> dict[str, Any]:
        """The preference, the tree and its cost, as written beside exports and predictions."""
        return {"tasks": [{"name": t["name"], "kind": t["kind"], "out_channels": t["out_channels"]}
                          for t in self.model.anchor.task_configs],
                "preference": {"r": self.r, "c": self.c, "budget": self.budget, "budget_metric": self.budget_metric},
                "tree": {"parents": self.architecture.to_list(),
                         "used_nodes": [sorted(u) for u in self.architecture.used_nodes()],
                         "paths": {t: self.architecture.path(i) for i, t in enumerate(self.model.tasks)}},
                "params": self.cost["params"], "gflops": self.cost["flops"] / 1e9,
                "params_fraction": self.cost["params"] / self.anchor_cost["params"],
                "gflops_fraction": self.cost["flops"] / self.anchor_cost["flops"],
                "input_shape": list(self.model.input_shape) if self.model.input_shape else None,
                "normalisation": NORMALISATION, "run_dir": str(self.run_dir.resolve())}

    def header(self) -> str:
        return f"{self.preference_text()}: tree {self.architecture}; {self.cost_text()}"


# ---------------------------------------------------------------- show


GRID_C = (0.0, 0.5, 1.0)


def show_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu show", description="the tree of a preference, as text and PNG; "
                                     "with --grid the trees of the uniform and one-hot preferences at c = 0, 0.5, 1")
    add_preference_arguments(parser, required=False)
    parser.add_argument("--grid", action="store_true",
                        help="the uniform and every one-hot preference at c = 0, 0.5 and 1 (the paper's figures 16-17)")
    parser.add_argument("--out", default=None, help="also draw the tree (or the grid) into this PNG")
    args = parser.parse_args(argv)
    args.command = "dymu show"
    from dymu.treeview import draw_tree, render_text, tree_drawing

    if args.run_dir is None:
        raise ValueError("missing --run_dir: pass the folder that `dymu run` wrote")
    if args.grid:
        if args.r is not None or args.c is not None:
            raise ValueError("--grid shows fixed preferences: pass it without --r and --c")
        model, root = load_run_model(args.run_dir, args.command)
        return show_grid(model, root, args.budget, args.budget_metric, args.out)
    missing = [f"--{k}" for k in ("r", "c") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: pass --r R... --c C (or --grid)")
    served = Served.load(args)
    drawing = tree_drawing(served.architecture, served.model.tasks)
    print(render_text(drawing, served.header()))
    if args.out:
        draw_tree(drawing, args.out, f"{served.preference_text()}\n{served.cost_text()}")
        print(f"wrote {args.out}")
    return 0


def grid_preferences(n: int) -> list[tuple[str, list[float]]]:
    """The uniform preference and the N one-hot ones, named."""
    return [("uniform", [1.0 / n] * n)] + [(f"one-hot {t}", [float(i == t) for i in range(n)]) for t in range(n)]


def show_grid(model: DynamicMultiTaskModel, run_dir: Path, budget: float | None, budget_metric: str,
              out: str | None) -> int:
    """Print (and draw) the trees of ``grid_preferences`` at every c of ``GRID_C``."""
    from dymu.treeview import draw_tree_grid, tree_drawing

    cells = []
    for name, r in grid_preferences(model.n_tasks):
        row = []
        label = name if not name.startswith("one-hot") else f"only {model.tasks[int(name.split()[1])]}"
        for c in GRID_C:
            served = Served.at(model, run_dir, r, c, budget, budget_metric)
            print(f"{label}, c = {c:g}: tree {served.architecture}; {served.cost_text()}")
            p, f = served.cost["params"] / served.anchor_cost["params"], served.cost["flops"] / served.anchor_cost["flops"]
            row.append((tree_drawing(served.architecture, model.tasks),
                        f"{label}, c = {c:g}\nparams {p:.2f}, GFLOPs {f:.2f} of the anchor"))
        cells.append(row)
    if out:
        draw_tree_grid(cells, out, f"trees of {run_dir.name}" + (f" within {budget:g} of the anchor's {budget_metric}"
                                                                 if budget is not None else ""))
        print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- export


def test_split_images(run_dir: Path, count: int) -> Tensor:
    """The first ``count`` images of the run's test split (fewer if it holds fewer), as the model takes them;
    ``ValueError`` naming the cause when the run's data cannot be built here."""
    import torch

    from stages.common import build_data
    from stages.evaluate import run_data_config

    images: list[Tensor] = []
    try:
        data = build_data(run_data_config(run_dir))
        data.setup("test")
        for batch in data.test_dataloader():
            images += list(batch["image"][:count - len(images)])
            if len(images) >= count:
                break
    except (FileNotFoundError, ValueError, OSError, KeyError) as err:
        raise ValueError(f"the test data of run {run_dir} is not available here ({' '.join(str(err).split())})") \
            from err
    if not images:
        raise ValueError(f"the test split of run {run_dir} holds no images")
    return torch.stack(images).float()


def real_images(run_dir: Path, count: int) -> Tensor | None:
    """Up to ``count`` images of the run's test split (None when the run's data cannot be built here)."""
    if count < 1:
        return None
    try:
        return test_split_images(run_dir, count)
    except ValueError as err:
        print(f"check on real inputs skipped: {err}")
        return None


EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu export", description="the static folded network of a preference "
                                     "exported, checked against PyTorch, with a JSON of its tree and cost beside it; "
                                     "with --all_trees every distinct network of a preference grid once")
    add_preference_arguments(parser, required=False)
    parser.add_argument("--format", choices=list(EXPORT_SUFFIXES), required=True)  # dymu.deploy.EXPORT_FORMATS
    parser.add_argument("--out", required=True,
                        help="the exported file (F.json is written beside it); with --all_trees a folder")
    parser.add_argument("--no_fold", action="store_true", help="keep the BatchNorms (folded by default)")
    parser.add_argument("--real_images", type=int, default=8,
                        help="test images of the run checked besides random inputs (0: random inputs only)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest error of the export against PyTorch, relative to the largest output (min 1)")
    parser.add_argument("--all_trees", action="store_true",
                        help="export every distinct network of the grid (--r_steps x --c_grid) once into the folder "
                             "--out, with index.json mapping each preference to its file")
    parser.add_argument("--r_steps", type=int, default=2,
                        help="with --all_trees: r on the simplex in steps of 1/R_STEPS, plus the uniform r (default 2)")
    parser.add_argument("--c_grid", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="with --all_trees: the values of c (default 0 0.25 0.5 0.75 1)")
    args = parser.parse_args(argv)
    args.command = "dymu export"
    import torch

    from dymu.deploy import require

    if args.run_dir is None:
        raise ValueError("missing --run_dir: pass the folder that `dymu run` wrote")
    require(args.format)  # a missing package fails before anything is loaded
    if args.all_trees:
        if args.r is not None or args.c is not None:
            raise ValueError("--all_trees exports the preferences of a grid: pass it without --r and --c "
                             "(--r_steps and --c_grid set the grid)")
        model, root = load_run_model(args.run_dir, args.command)
        return export_all_trees(model, root, args)
    missing = [f"--{k}" for k in ("r", "c") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}: pass --r R... --c C (or --all_trees)")
    served = Served.load(args)
    if not served.model.input_shape:
        raise ValueError("the run's model records no input shape; cannot build an example input to export")
    gen = torch.Generator().manual_seed(0)
    real = real_images(served.run_dir, args.real_images)
    record = export_checked(served, lean_network(served, not args.no_fold), args.format, Path(args.out), gen, real)
    meta = Path(args.out).with_name(Path(args.out).name + ".json")
    print(served.header())
    for name, c in record["check"].items():
        print(f"check on {c['batch']} {name} inputs: max error against PyTorch "
              f"{c['against_pytorch']['max_abs_error']:.3g}, against the dynamic model "
              f"{c['against_dynamic_model']['max_abs_error']:.3g}")
    print(f"wrote {args.out} and {meta}")
    worst = record["max_check_error"]
    if not worst <= args.tolerance:
        raise ValueError(f"the exported model differs from PyTorch by {worst:.3g} (relative), above --tolerance "
                         f"{args.tolerance:g}; see {meta}")
    return 0


def lean_network(served: Served, fold: bool):  # noqa: ANN201 - a LeanNet
    """The static network of ``served``'s preference: BatchNorms folded (``fold``) or kept."""
    from dymu.deploy import LeanNet

    if fold:
        return served.specialize(fold_bn=True)
    return LeanNet.create(served.specialize(fold_bn=False), fold_bn=False, copy_modules=False)


def export_checked(served: Served, lean: Any, fmt: str, out: Path, gen: torch.Generator, real: Tensor | None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``lean`` (the network of ``served``'s preference) to ``out``, run the file again on random inputs
    (and ``real`` images) against PyTorch and the dynamic model, and write ``out.json`` beside it; returns
    that record."""
    import torch

    from dymu.deploy import ExportedModel, export_model, max_difference

    model = served.model
    example = torch.rand(2, *model.input_shape, generator=gen) * 2 - 1
    out = export_model(lean, example, out, fmt)
    exported = ExportedModel(out, fmt)
    checks: dict[str, Any] = {}
    inputs = {"random": torch.rand(3, *model.input_shape, generator=gen) * 2 - 1}
    if real is not None:
        inputs["real"] = real
    for name, x in inputs.items():
        with torch.no_grad():
            pytorch = [lean(x)[t] for t in model.tasks]
            dynamic = [model(x, served.r, served.c, **served.forward_kwargs())[t] for t in model.tasks]
        got = exported(x)
        checks[name] = {"batch": int(x.shape[0]), "against_pytorch": max_difference(got, pytorch),
                        "against_dynamic_model": max_difference(got, dynamic)}
    worst = max(c["against_pytorch"]["max_rel_error"] for c in checks.values())
    record = {"format": fmt, "file": out.name, **served.summary(),
              "folded_batchnorms": getattr(lean, "folded_batchnorms", 0), "inputs": ["image"],
              "outputs": model.tasks, "check": checks, "max_check_error": worst, **(extra or {})}
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=1))
    return record


MAX_GRID = 5000


def preference_grid(n_tasks: int, r_steps: int, cs: Sequence[float]) -> list[tuple[list[float], float]]:
    """Every ``r`` on the simplex in steps of ``1 / r_steps`` (the lattice), the uniform ``r`` added if the
    lattice lacks it, times every ``c`` of ``cs``."""
    from itertools import combinations

    if r_steps < 1:
        raise ValueError(f"--r_steps must be at least 1, got {r_steps}")
    count = math.comb(r_steps + n_tasks - 1, n_tasks - 1) * len(cs)
    if count > MAX_GRID:
        raise ValueError(f"the grid has {count} preferences ({n_tasks} tasks, --r_steps {r_steps}, {len(cs)} values "
                         f"of c), more than {MAX_GRID}: use a smaller --r_steps")
    rs = []
    for bars in combinations(range(r_steps + n_tasks - 1), n_tasks - 1):  # stars and bars
        edges = (-1, *bars, r_steps + n_tasks - 1)
        rs.append([(edges[i + 1] - edges[i] - 1) / r_steps for i in range(n_tasks)])
    uniform = [1.0 / n_tasks] * n_tasks
    if not any(np.allclose(r, uniform) for r in rs):
        rs.append(uniform)
    return [(r, float(c)) for r in rs for c in cs]


def network_digest(lean: Any) -> str:
    """sha256 of a static network's tree and every tensor of its state dict (names, dtypes, shapes, bytes):
    two networks with the same digest compute the same function."""
    import hashlib

    import torch

    digest = hashlib.sha256(str(lean.architecture).encode())
    for name, tensor in lean.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def export_all_trees(model: DynamicMultiTaskModel, root: Path, args: argparse.Namespace) -> int:
    """``dymu export --all_trees``: every distinct static network of the grid exported once into ``args.out``,
    ``index.json`` listing each grid preference and its file.

    Distinct: without a weight hypernet a preference's network is fixed by its tree, so one file per tree.
    With one, the folded weights carry the BatchNorm shifts of the preference (``gamma + delta_gamma(r, c)``),
    so two preferences share a file only when their networks are identical: same tree and the same folded
    state dict, bit for bit (``network_digest``) - in practice one file per preference once the weight
    hypernet is trained. Every preference is checked against its file: the file's outputs against
    ``model(x, r, c)``."""
    import torch

    from dymu.deploy import ExportedModel, max_difference

    if not model.input_shape:
        raise ValueError("the run's model records no input shape; cannot build an example input to export")
    out = Path(args.out)
    if out.suffix in EXPORT_SUFFIXES.values() or out.is_file():
        raise ValueError(f"--all_trees writes a folder of files: --out {out} looks like a file")
    grid = preference_grid(model.n_tasks, args.r_steps, args.c_grid)
    by_weights = model.weight_hypernet is not None
    gen = torch.Generator().manual_seed(0)
    real = real_images(root, args.real_images)
    check_x = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    files: dict[Any, dict[str, Any]] = {}
    entries = []
    exported: dict[str, Any] = {}
    for r, c in grid:
        served = Served.at(model, root, r, c, args.budget, args.budget_metric)
        lean = None
        if by_weights:
            lean = lean_network(served, not args.no_fold)
            key: Any = network_digest(lean)
        else:
            key = served.architecture
        if key not in files:
            lean = lean if lean is not None else lean_network(served, not args.no_fold)
            name = f"net_{len(files):03d}{EXPORT_SUFFIXES[args.format]}"
            record = export_checked(served, lean, args.format, out / name, gen, real)
            files[key] = {"file": name, "tree": served.architecture.to_list(), "params": served.cost["params"],
                          "gflops": served.cost["flops"] / 1e9, "max_check_error": record["max_check_error"],
                          "preferences": 0, **({"sha256": key} if by_weights else {})}
            exported[name] = ExportedModel(out / name, args.format)
            print(f"{name}: {served.header()}")
        entry = files[key]
        entry["preferences"] += 1
        with torch.no_grad():
            expected = model(check_x, served.r, served.c, **served.forward_kwargs())
        error = max_difference(exported[entry["file"]](check_x), [expected[t] for t in model.tasks])
        entries.append({"r": served.r, "c": served.c, "file": entry["file"], "tree": served.architecture.to_list(),
                        "max_error_against_model": error["max_rel_error"]})
    worst = max(e["max_error_against_model"] for e in entries)
    index = {"format": args.format, "run_dir": str(root), "tasks": model.tasks,
             "grid": {"r_steps": args.r_steps, "c": [float(c) for c in args.c_grid], "budget": args.budget,
                      "budget_metric": args.budget_metric, "preferences": len(grid)},
             "distinct_by": "folded weights (sha256 of the tree and the state dict)" if by_weights else "tree",
             "folded": not args.no_fold, "files": list(files.values()), "preferences": entries,
             "max_error_against_model": worst}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"wrote {len(files)} distinct networks for {len(grid)} preferences under {out} (index.json; distinct by "
          f"{index['distinct_by']}); largest error of a preference's file against the model {worst:.3g}")
    if not worst <= args.tolerance:
        raise ValueError(f"a preference's exported network differs from the model by {worst:.3g} (relative), above "
                         f"--tolerance {args.tolerance:g}; see {out / 'index.json'}")
    return 0


# ---------------------------------------------------------------- predict


def image_files(inputs: Sequence[str]) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders whose image files are taken, sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not files:
        raise ValueError("no input images given")
    return files


def check_image(path: Path, input_shape: Sequence[int]) -> None:
    """Raise ``ValueError`` naming the problem when ``path`` is not an image the model takes."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = input_shape
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            image.load()  # decodes the pixels: a truncated or corrupt file fails here, before anything is written
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    if mode not in CHANNEL_MODES.get(channels, ()):
        expected = "/".join(CHANNEL_MODES.get(channels, ("?",)))
        bands = Image.getmodebands(mode)
        raise ValueError(f"image {path} is {mode} ({bands} channel{'s' if bands != 1 else ''}); the model takes "
                         f"{channels}-channel images ({expected})")
    if size != (width, height):
        raise ValueError(f"image {path} is {size[0]}x{size[1]} (width x height); the model takes {width}x{height}")


def read_image(path: Path, channels: int) -> Tensor:
    """An image as the data modules feed it: ``(C, H, W)`` in [-1, 1]."""
    import torch
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as err:  # changed or removed since check_image
        raise ValueError(f"cannot read image {path}: {err}") from err
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def write_images(images: Tensor, folder: Path) -> list[Path]:
    """Images as the model takes them (``(B, C, H, W)`` in [-1, 1]) written as 8-bit PNGs ``test_000.png``, ...
    (``read_image`` reads them back to within one grey level)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, x in enumerate(images):
        array = ((x.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        path = folder / f"test_{i:03d}.png"
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, "L" if array.shape[-1] == 1 else "RGB"
                        ).save(path)
        paths.append(path)
    return paths


def palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (class k's colour from the bits of k), flattened for ``Image.putpalette``."""
    colours = []
    for k in range(n):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours += [r, g, b]
    return colours


def colour_map(values: np.ndarray, name: str = "magma") -> np.ndarray:
    """A 2-D array scaled to its own min..max and coloured: ``(H, W, 3)`` uint8."""
    import matplotlib

    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return (matplotlib.colormaps[name](scaled)[..., :3] * 255).round().astype(np.uint8)


def write_output(kind: str, output: Tensor, path_stem: Path) -> Path:
    """One task's output for one image: dense maps as PNG (segmentation: class indices in a palette image;
    depth: a colour map; normals: ``(n + 1) / 2`` as RGB; edges and saliency: sigmoid as grey), vectors as
    JSON (class scores with the arg max, or values)."""
    import torch
    from PIL import Image

    y = output.detach().float().cpu()
    if y.dim() == 1:
        if kind == "classification":
            scores = torch.softmax(y, dim=0)
            record: dict[str, Any] = {"class": int(scores.argmax()), "scores": [float(v) for v in scores],
                                      "logits": [float(v) for v in y]}
        else:
            record = {"values": [float(v) for v in y]}
        path = path_stem.with_suffix(".json")
        path.write_text(json.dumps(record))
        return path
    path = path_stem.with_suffix(".png")
    if kind == "semseg" or (y.shape[0] > 3 and kind not in ("depth", "normals")):
        labels = y.argmax(dim=0).numpy().astype(np.uint8)
        image = Image.fromarray(labels, mode="P")
        image.putpalette(palette())
    elif kind == "normals" and y.shape[0] == 3:
        n = torch.nn.functional.normalize(y, dim=0)
        image = Image.fromarray(((n + 1) / 2 * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy(), "RGB")
    elif kind in ("edges", "saliency") and y.shape[0] == 1:
        image = Image.fromarray((torch.sigmoid(y[0]) * 255).round().byte().numpy(), "L")
    else:
        image = Image.fromarray(colour_map(y[0].numpy()), "RGB")
    image.save(path)
    return path


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu predict", description="per-task outputs of images for a preference, "
                                     "from a run (--run_dir, --r, --c) or from a file of `dymu export` (--model)")
    add_preference_arguments(parser, required=False)
    parser.add_argument("--model", default=None, help="a file written by `dymu export` (its F.json beside it)")
    parser.add_argument("--out", required=True, help="output folder: OUT/<task>/<image name>.png|json")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--test_images", type=int, default=0, metavar="N",
                        help="also the first N images of the run's test split (with --model: of the run named in "
                             "its JSON), written as OUT/inputs/test_000.png, ... and predicted like the other files")
    parser.add_argument("inputs", nargs="*", help="image files or folders of images")
    args = parser.parse_args(argv)
    args.command = "dymu predict"
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.test_images < 0:
        raise ValueError(f"--test_images must be at least 0, got {args.test_images}")
    if not args.inputs and not args.test_images:
        raise ValueError("no input images given: pass image files or folders, or --test_images N for images of the "
                         "run's test split")
    if args.model is not None:
        if args.run_dir is not None or args.r is not None or args.c is not None or args.budget is not None:
            raise ValueError("pass either --model (an exported file, whose preference is fixed) or --run_dir with "
                             "--r and --c, not both")
        summary, predict, header = exported_predictor(Path(args.model))
    else:
        missing = [f"--{k}" for k in ("run_dir", "r", "c") if getattr(args, k) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}: pass --run_dir D --r R... --c C (or --model F)")
        served = Served.load(args)
        net = served.specialize(fold_bn=True)
        summary, header = served.summary(), served.header()
        tasks = served.model.tasks

        def predict(x: Tensor) -> list[Tensor]:
            outputs = net(x)
            return [outputs[t] for t in tasks]

    shape = summary["input_shape"]
    if shape is None or len(shape) != 3:
        raise ValueError(f"dymu predict reads images; this model takes inputs of shape {shape}")
    files = image_files(args.inputs) if args.inputs else []
    for path in files:  # every input is checked before anything is computed or written
        check_image(path, shape)
    if args.test_images:
        run_dir = Path(args.run_dir) if args.run_dir is not None else Path(summary.get("run_dir") or "")
        if args.run_dir is None and not run_dir.is_dir():
            raise FileNotFoundError(f"--test_images reads the run that {args.model} was exported from, "
                                    f"{summary.get('run_dir')}, which is not here: pass image files instead")
        images = test_split_images(run_dir, args.test_images)
        if tuple(images.shape[1:]) != tuple(shape):
            raise ValueError(f"the run's test images are {tuple(images.shape[1:])}; the model takes {tuple(shape)}")
        files += write_images(images, Path(args.out) / "inputs")
    print(header)
    predict_files(files, predict, summary["tasks"], int(shape[0]), Path(args.out), args.batch_size)
    (Path(args.out) / "predict.json").write_text(json.dumps({**summary, "inputs": [str(p) for p in files]},
                                                            indent=1))
    print(f"wrote {len(files)} x {len(summary['tasks'])} outputs under {args.out}")
    return 0


def exported_predictor(path: Path) -> tuple[dict[str, Any], Callable[[Tensor], list[Tensor]], str]:
    """An exported file's record (``F.json``), its forward and a header line."""
    from dymu.deploy import ExportedModel

    meta = path.with_name(path.name + ".json")
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} does not exist: pass a file written by `dymu export` with its JSON beside it")
    try:
        summary = json.loads(meta.read_text())
        fmt = summary["format"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{meta} is not the record `dymu export` writes ({err})") from err
    exported = ExportedModel(path, fmt)
    pref = summary["preference"]
    header = (f"{path} ({fmt}): r = ({', '.join(f'{v:.3g}' for v in pref['r'])}), c = {pref['c']:g}; "
              f"{summary['params']:,} params, {summary['gflops']:.4g} GFLOPs")
    return summary, exported, header


def unique_stems(files: Sequence[Path]) -> list[str]:
    """Output names: each file's stem, with ``_2``, ``_3``, ... added where two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for path in files:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        names.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return names


def predict_files(files: Sequence[Path], predict: Callable[[Tensor], list[Tensor]], task_configs: Sequence[dict],
                  channels: int, out: Path, batch_size: int) -> list[Path]:
    """Run ``predict`` on the images in batches and write every task's output per image."""
    import torch
    from tqdm import tqdm

    for t in task_configs:
        (out / t["name"]).mkdir(parents=True, exist_ok=True)
    names = unique_stems(files)
    written = []
    batches = range(0, len(files), batch_size)
    for start in tqdm(batches, desc="predict", unit="batch", disable=None):
        x = torch.stack([read_image(p, channels) for p in files[start:start + batch_size]])
        with torch.no_grad():
            outputs = predict(x)
        for t, y in zip(task_configs, outputs):
            for i, name in enumerate(names[start:start + batch_size]):
                written.append(write_output(t["kind"], y[i], out / t["name"] / name))
    return written
