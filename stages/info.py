"""``dymu info --config pipeline.yaml``: sizes of the configured networks, without data or training, beside
the paper's figures for the same setting (DYMU tables 1-4); ``dymu info --stages``: the stage table."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from dymu.anchor import batchnorm_names
from dymu.model import DynamicMultiTaskModel
from dymu.paper_figures import PaperSetting, paper_setting
from stages.common import build_backbone_from_config, build_data


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """The data module, N, L, the anchor's parameters and GFLOPs at the data's input size, and the hypernets'
    sizes."""
    data = build_data(config["data"])
    backbone = build_backbone_from_config(config["backbone"])
    size = lambda stage: {k: v for k, v in ((config.get(stage) or {}).get("model") or {}).items()  # noqa: E731
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
    }


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


def format_rows(rows: list[Row]) -> str:
    """A Markdown table: quantity | ours | paper | ours / paper."""
    lines = [["quantity", "ours", "paper", "ours / paper"], *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    return "\n".join([fmt(lines[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(fmt, lines[1:])])


def format_info(info: dict[str, Any]) -> str:
    """Our sizes as ``key  value`` lines, then the paper's figures beside them where the paper has the setting."""
    width = max(map(len, info))
    lines = [f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}"
             for key, value in info.items()]
    paper = paper_setting(info["data"], info["tasks"])
    if paper is None:
        lines += ["", "no paper figures for this data set and task list (DYMU tables 1-4 have none)"]
    else:
        lines += ["", f"{paper.table} ({paper.name}): Single-Task row; control params of Ours and Ours w/o "
                      "adaptation", "", format_rows(paper_rows(info, paper))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stages.graph import describe_table
    from stages.runner import load_pipeline_config

    parser = argparse.ArgumentParser(prog="dymu info", description=__doc__)
    parser.add_argument("--config", help="pipeline config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config entry, e.g. --set backbone.init_args.width=1.0 (repeatable)")
    parser.add_argument("--stages", action="store_true", help="print the stage table (no config needed)")
    args = parser.parse_args(argv)
    if args.config is None and not args.stages:
        parser.error("give --config (the networks' sizes) or --stages (the stage table)")
    if args.stages:
        print(describe_table())
    if args.config is not None:
        if args.stages:
            print()
        print(format_info(describe(load_pipeline_config(args.config, args.overrides))))
    return 0
