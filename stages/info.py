"""``dymu info --config pipeline.yaml``: sizes of the configured networks, without data or training."""

from __future__ import annotations

import argparse
from typing import Any

from dymu.anchor import batchnorm_names
from dymu.model import DynamicMultiTaskModel
from stages.common import build_backbone_from_config, build_data, read_yaml


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """N, L, the anchor's parameters and GFLOPs at the data's input size, and the hypernets' sizes."""
    data = build_data(config["data"])
    backbone = build_backbone_from_config(config["backbone"])
    size = lambda stage: {k: v for k, v in ((config.get(stage) or {}).get("model") or {}).items()  # noqa: E731
                          if k in ("embed_dim", "hidden")}
    model = DynamicMultiTaskModel.build(backbone, data.tasks, edge=size("edge"), weight=size("weight"),
                                        input_shape=data.input_shape)
    anchor = model.anchor
    cost = model.node_costs()
    return {
        "tasks": model.tasks,
        "N": anchor.n_tasks,
        "L": anchor.n_layers,
        "input_shape": list(data.input_shape),
        "anchor_params": sum(p.numel() for p in anchor.parameters()),
        "anchor_gflops": (sum(map(sum, cost.node_flops)) + sum(cost.head_flops)) / 1e9,
        # torch's flop counter counts a multiply-add as 2 FLOPs; papers often quote multiply-adds as FLOPs
        "anchor_gmacs": (sum(map(sum, cost.node_flops)) + sum(cost.head_flops)) / 2e9,
        "stream_params": [sum(row[t] for row in cost.node_params) for t in range(anchor.n_tasks)],
        "head_params": list(cost.head_params),
        "edge_hypernet_params": sum(p.numel() for p in model.edge_hypernet.parameters()),
        "weight_hypernet_params": sum(p.numel() for p in model.weight_hypernet.parameters()),
        "modulated_batchnorms": len(batchnorm_names(anchor)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu info", description=__doc__)
    parser.add_argument("--config", required=True, help="pipeline config")
    args = parser.parse_args(argv)
    info = describe(read_yaml(args.config))
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0
