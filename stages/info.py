"""``dymu info --config pipeline.yaml``: sizes of the configured networks, without data or training, beside
the paper's figures for the same setting (DYMU tables 1-4): DYMU's anchor and hypernets, and the baselines the
config has a section for; ``dymu info --stages``: the stage table."""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.common import build_backbone_from_config, build_data
from stages.graph import STAGES

if TYPE_CHECKING:  # torch and the models are imported where used: `dymu info --help` and `--stages` are fast
    from dymu.anchor import NodeCosts
    from dymu.baselines.base import BaselineModel
    from dymu.paper_figures import PaperSetting
    from stages.pipeline import PipelineConfig

BASELINE_MODELS = {"shared_mtl": "static", "static": "static", "phn": "phn", "phn_bn": "phn_bn", "ltb": "ltb",
                   "bmtas": "bmtas", "feature_partitioning": "feature_partitioning"}
"""Baseline stage -> the kind of ``dymu.baselines`` model its LightningModule trains."""

SHARED_NETWORK_KINDS = ("static", "phn", "phn_bn")
"""Baselines whose inference network is the shared network (``dymu.baselines.base.shared_network``: the anchor
specialised to ``Architecture.shared``), so its cost is that tree's in the anchor's node costs. The others
(LTB, BMTAS, feature partitioning) run the network their search finds: known after training."""

NOT_SIZED = {"retrain": "retrains the trees that other stages find (edge, ltb, bmtas): sized after them"}
"""Baseline stages whose network info cannot build from the config alone, and why."""

MODEL_ARGUMENTS = ("self", "backbone", "tasks", "input_shape")


def describe(config: PipelineConfig) -> dict[str, Any]:
    """The data module, N, L, the anchor's parameters and GFLOPs at the data's input size, the hypernets'
    sizes and, under ``baselines``, the sizes of the baselines the config has a section for
    (``describe_baselines``)."""
    from dymu.anchor import batchnorm_names
    from dymu.model import DynamicMultiTaskModel

    data = build_data(config.data)
    backbone = build_backbone_from_config(config.backbone)
    size = lambda stage: {k: v for k, v in config.section(stage).model.items()  # noqa: E731
                          if k in ("embed_dim", "hidden")}
    model = DynamicMultiTaskModel.build(backbone, data.tasks, edge=size("edge"), weight=size("weight"),
                                        input_shape=data.input_shape)
    anchor = model.anchor
    cost = model.node_costs()
    flops = sum(map(sum, cost.node_flops)) + sum(cost.head_flops)
    return {
        "data": f"{type(data).__module__}.{type(data).__qualname__}",
        "tasks": model.tasks,
        "N": anchor.n_tasks,
        "L": anchor.n_layers,
        "input_shape": list(data.input_shape),
        "anchor_params": sum(p.numel() for p in anchor.parameters()),
        "anchor_gflops": flops / 1e9,
        # torch's flop counter counts a multiply-add as 2 FLOPs; papers often quote multiply-adds as FLOPs
        "anchor_gmacs": flops / 2e9,
        "stream_params": [sum(row[t] for row in cost.node_params) for t in range(anchor.n_tasks)],
        "head_params": list(cost.head_params),
        "edge_hypernet_params": sum(p.numel() for p in model.edge_hypernet.parameters()),
        "weight_hypernet_params": sum(p.numel() for p in model.weight_hypernet.parameters()),
        "modulated_batchnorms": len(batchnorm_names(anchor)),
        "baselines": describe_baselines(config, cost, data.input_shape),
    }


def build_baseline(config: PipelineConfig, stage: str) -> BaselineModel:
    """The ``dymu.baselines`` model that baseline ``stage`` trains, as the pipeline config's section sets it up,
    with fresh weights: no data, no training, no parent checkpoint (PHN-BN's frozen network, the searches'
    anchor streams). The model's size arguments are the stage's model arguments of the same name (the stage's
    defaults where the section sets none); a repeated stage's first instance."""
    from dymu.baselines.base import baseline_class
    from stages.runner import stage_config

    spec = STAGES[stage]
    folder, model_args = spec.instances(config)[0]
    section = stage_config(config, stage, "<run_dir>", folder=folder, model_args=model_args)
    data = build_data(section["data"])
    model_class = baseline_class(BASELINE_MODELS[stage])
    stage_arguments = inspect.signature(spec.model_class().__init__).parameters
    sizes = {}
    for name in inspect.signature(model_class.__init__).parameters:
        if name in MODEL_ARGUMENTS or name not in stage_arguments:
            continue
        if name in section["model"]:
            sizes[name] = section["model"][name]
        elif stage_arguments[name].default is not inspect.Parameter.empty:
            sizes[name] = stage_arguments[name].default
    return model_class(build_backbone_from_config(config.backbone), data.tasks, data.input_shape, **sizes)


def describe_baselines(config: PipelineConfig, costs: NodeCosts, input_shape: Any) -> dict[str, dict[str, Any]]:
    """For each baseline stage with a section in ``config``: its model, instances, control parameters and, for
    a baseline that runs the shared network, that network's parameters and FLOPs (the shared tree's in the
    anchor's node costs ``costs``, measured at ``input_shape``; batch 1), else the parameters its search trains;
    for a stage whose network depends on its parents' results (``NOT_SIZED``), its instances and a note."""
    from dymu.anchor import count_parameters
    from dymu.search_space import Architecture

    out: dict[str, dict[str, Any]] = {}
    for spec in STAGES.values():
        if spec.in_pipeline or not spec.trained or not config.has_section(spec.name):
            continue
        instances = len(spec.instances(config))
        if spec.name not in BASELINE_MODELS:
            out[spec.name] = {"instances": instances,
                              "note": NOT_SIZED.get(spec.name, "info does not build this stage's model")}
            continue
        model = build_baseline(config, spec.name)
        entry: dict[str, Any] = {"model": f"{type(model).__module__}.{type(model).__qualname__}",
                                 "instances": instances, "control_params": model.control_parameters()}
        if model.kind in SHARED_NETWORK_KINDS:
            if tuple(model.input_shape or ()) == tuple(input_shape):
                cost = costs.cost(Architecture.shared(model.n_tasks, len(costs.node_params)))
            else:  # the section's data changes the input: measure the network itself
                cost = model.cost()
            entry.update(inference_params=cost["params"], inference_gflops=cost["flops"] / 1e9,
                         inference_gmacs=cost["flops"] / 2e9)
        else:
            entry["search_params"] = count_parameters(model)
        out[spec.name] = entry
    return out


@dataclass(frozen=True)
class Row:
    """One quantity, ours beside the paper's (None where the paper gives none)."""

    quantity: str
    ours: float
    paper: float | None
    unit: str  # "params" (ours as a count, the paper's in millions) or "G" (1e9, two decimals)

    @property
    def ratio(self) -> float | None:
        return None if self.paper is None else self.ours / self.paper

    def cells(self) -> list[str]:
        if self.unit == "params":
            ours, paper = f"{int(self.ours):,}", None if self.paper is None else f"{self.paper / 1e6:.2f}M"
        else:
            ours, paper = f"{self.ours:.2f}", None if self.paper is None else f"{self.paper:.2f}"
        ratio = None if self.ratio is None else f"{self.ratio:.3f}"
        return [self.quantity, ours, paper or "-", ratio or "-"]


def paper_rows(info: dict[str, Any], paper: PaperSetting) -> list[Row]:
    """Our sizes (from :func:`describe`) beside the paper's: the anchor is its "Single-Task" row, the edge
    hypernet the control parameters of "Ours w/o adaptation", both hypernets those of "Ours"."""
    edge, weight = info["edge_hypernet_params"], info["weight_hypernet_params"]
    return [
        Row("anchor params", info["anchor_params"], paper.anchor_params, "params"),
        Row('anchor GMACs (paper: its "GFLOPs")', info["anchor_gmacs"], paper.anchor_gflops, "G"),
        Row("anchor GFLOPs (2 per multiply-add)", info["anchor_gflops"], None, "G"),
        Row("edge hypernet params (control, w/o adaptation)", edge, paper.edge_params, "params"),
        Row("weight hypernet params (paper: control - edge)", weight, paper.weight_params, "params"),
        Row("control params (edge + weight hypernets)", edge + weight, paper.control_params, "params"),
    ]


def baseline_rows(baselines: dict[str, dict[str, Any]], paper: PaperSetting | None) -> list[Row]:
    """The baselines' sizes (from :func:`describe_baselines`), each beside the paper's figure where its tables
    1-4 have the baseline's row (PHN, PHN-BN). Control params are listed for the baselines that have a hypernet
    (none for a static network or a search); a stage with a note (``NOT_SIZED``) has no rows."""
    rows = []
    for stage, info in baselines.items():
        if "note" in info:
            continue
        figures = None if paper is None else paper.baselines.get(stage)
        if "inference_params" in info:
            each = f" (each of {info['instances']})" if info["instances"] > 1 else ""
            rows += [Row(f"{stage}: inference params{each}", info["inference_params"],
                         figures and figures.inference_params, "params"),
                     Row(f'{stage}: inference GMACs (paper: its "GFLOPs")', info["inference_gmacs"],
                         figures and figures.gflops, "G"),
                     Row(f"{stage}: inference GFLOPs (2 per multiply-add)", info["inference_gflops"], None, "G")]
        else:
            rows.append(Row(f"{stage}: params the search trains", info["search_params"], None, "params"))
        if info["control_params"] or figures is not None:
            rows.append(Row(f"{stage}: control params", info["control_params"], figures and figures.control_params,
                            "params"))
    return rows


def format_rows(rows: list[Row]) -> str:
    """A Markdown table: quantity | ours | paper | ours / paper."""
    lines = [["quantity", "ours", "paper", "ours / paper"], *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([fmt(lines[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(fmt, lines[1:])])


def format_info(info: dict[str, Any]) -> str:
    """Our sizes as ``key  value`` lines, then the paper's figures beside them where the paper has the setting,
    then the baselines' sizes (beside the paper's PHN and PHN-BN rows)."""
    from dymu.paper_figures import paper_setting

    scalars = {key: value for key, value in info.items() if key != "baselines"}
    width = max(map(len, scalars))
    lines = [f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}"
             for key, value in scalars.items()]
    paper = paper_setting(info["data"], info["tasks"])
    if paper is None:
        lines += ["", "no paper figures for this data set and task list (DYMU tables 1-4 have none)"]
    else:
        lines += ["", f"{paper.table} ({paper.name}): Single-Task row; control params of Ours and Ours w/o "
                      "adaptation", "", format_rows(paper_rows(info, paper))]
    baselines = info.get("baselines") or {}
    if baselines:
        source = "" if paper is None else f"; paper: {paper.table}'s PHN and PHN-BN rows"
        lines += ["", f"baselines (the config's sections; inference at the input size above, batch 1{source})", "",
                  format_rows(baseline_rows(baselines, paper))]
        searches = [stage for stage, entry in baselines.items() if "search_params" in entry]
        if searches:
            lines.append(f"{', '.join(searches)}: inference runs the network the search finds (known after training)")
        lines += [f"{stage}: {entry['note']}" for stage, entry in baselines.items() if "note" in entry]
    return "\n".join(lines)


def describe_controller(run_dir: str) -> str:
    """The measured controller of a run (``edge.model.search: measured``): its calibration, as recorded in the
    edge stage's checkpoint, and how its trees are searched."""
    from dymu.checkpoint import META_KEY, load_checkpoint
    from dymu.controller import EXACT_TREE_LIMIT, count_trees
    from dymu.layout import RunLayout

    path = RunLayout(run_dir).final("edge")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} has no finished edge stage (run `dymu run` first)")
    checkpoint = load_checkpoint(path)
    record = checkpoint[META_KEY].get("calibration")
    if record is None:
        return f"{run_dir}: the edge stage searched with the paper's Gumbel search (no measured controller)"
    paths, n = checkpoint["state_dict"]["model.controller.path_loss_sums"].shape
    n_layers = round(math.log(paths, n)) if n > 1 else 1
    trees = count_trees(n, n_layers)
    search = f"{paths:,} measured paths; {trees:,} trees, searched " + (
        "exactly (every tree)" if trees <= EXACT_TREE_LIMIT else "by local search")
    quartiles = ", ".join(f"{v:.2f}" for v in record["break_even_c_quartiles"])
    uniform = ", ".join(f"{v:.2f}" for v in record["uniform_break_even_c"]) or "none"
    rule = (f"the uniform preference's last sharing step breaks even at c = {record['floor_break_even']:g}"
            if record.get("rule") == "uniform floor" else
            "the median sharing step breaks even at c = 0.5: the uniform preference has none")
    lines = [f"measured controller of {run_dir}",
             f"  trade-off lambda        {record['trade_off']:.4g} ({rule})",
             f"  base frugality gamma    {record['base_frugality']:g}   (mu(c) = lambda * (gamma + (1 - gamma) c))",
             f"  cost term               {record['cost_metric']}",
             f"  sharing steps           {record['steps']} over {record['preferences']} calibration preferences, "
             f"break-even c quartiles {quartiles}",
             f"  uniform preference      break-even c {uniform}"]
    lines.append(f"  search                  {search}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stages.graph import describe_table
    from stages.pipeline import load_pipeline_config

    parser = argparse.ArgumentParser(prog="dymu info", description=__doc__)
    parser.add_argument("--config", help="pipeline config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config entry, e.g. --set backbone.init_args.width=1.0 (repeatable)")
    parser.add_argument("--stages", action="store_true", help="print the stage table (no config needed)")
    parser.add_argument("--run_dir", help="a run directory: print its measured controller's calibration")
    args = parser.parse_args(argv)
    if args.config is None and not args.stages and args.run_dir is None:
        parser.error("give --config (the networks' sizes), --stages (the stage table) or --run_dir (a run's "
                     "controller)")
    if args.run_dir is not None:
        from dymu.model import run_checkpoint

        print(describe_controller(args.run_dir))
        note = run_checkpoint(args.run_dir)[1]
        if note is not None:
            print(f"dymu info: warning: {note}", file=sys.stderr)
    if args.stages:
        print(describe_table())
    if args.config is not None:
        if args.stages:
            print()
        print(format_info(describe(load_pipeline_config(args.config, args.overrides))))
    return 0
