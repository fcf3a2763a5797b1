"""Two-process DDP on CPU (gloo) for every stage, through the runner."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from stages.runner import run_pipeline
from tests.test_pipeline import CSV, tiny_config, tiny_trainer


def test_every_stage_runs_under_two_process_ddp(tmp_path: Path):
    config = tiny_config(steps=4, logger=CSV)
    # the weight stage trains only the BatchNorm heads of the sampled tree's nodes, so it needs DDP's
    # unused-parameter detection
    for stage, strategy in (("anchor", "ddp"), ("edge", "ddp"), ("weight", "ddp_find_unused_parameters_true")):
        config[stage]["trainer"].update({"devices": 2, "strategy": strategy})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = run_pipeline(path, tmp_path / "run")
    for stage in ("anchor", "edge", "weight"):
        ckpt = torch.load(run_dir / stage / "final.ckpt", weights_only=True)
        assert ckpt["global_step"] == 4, stage
    anchor = torch.load(run_dir / "anchor" / "final.ckpt", weights_only=True)["state_dict"]
    weight = torch.load(run_dir / "weight" / "final.ckpt", weights_only=True)["state_dict"]
    key = "model.anchor.streams.1.1.body.0.0.weight"
    assert torch.equal(anchor[key], weight[key]), "the anchor must stay frozen under DDP"
    assert (run_dir / "evaluation" / "metrics.json").is_file()


def test_measured_controller_under_two_process_ddp_sums_every_shard(tmp_path: Path):
    """The edge stage's path losses under DDP: each process measures its shard of the validation set and the
    sums add up to one process's measurement of the whole set; the anchor's random trees agree across
    processes (seeded by the step)."""
    from datamodules.synthetic import SyntheticScenesDataModule
    from dymu.controller import measure_path_losses
    from dymu.model import DynamicMultiTaskModel

    config = tiny_config(steps=4, logger=CSV)
    config["anchor"]["model"] = {"random_tree_weight": 0.25}
    config["edge"]["model"] = {"search": "measured", "embed_dim": 8, "hidden": 16, "preference_groups": 4}
    for stage in ("anchor", "edge"):
        config[stage]["trainer"].update({"devices": 2, "strategy": "ddp"})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = run_pipeline(path, tmp_path / "run", stages=("edge",))
    model = DynamicMultiTaskModel.from_checkpoint(run_dir / "edge" / "final.ckpt")
    data = SyntheticScenesDataModule(**config["data"]["init_args"])
    data.setup("fit")
    sums, supports = measure_path_losses(model.anchor, data.tasks, data.val_dataloader())
    torch.testing.assert_close(model.controller.supports, supports)
    torch.testing.assert_close(model.controller.path_loss_sums, sums, rtol=1e-5, atol=1e-7)


def test_bmtas_restarts_under_two_process_ddp(tmp_path: Path):
    """BMTAS's restarts under DDP: both searches train (the weight steps' gradients averaged over the ranks, the
    routing logits' in every architecture step), and the search kept is the one with the smallest objective on
    the architecture split (which every rank holds whole; rank 0 writes the checkpoint)."""
    config = tiny_config(steps=4, logger=CSV)
    config["bmtas"] = {"trainer": {**tiny_trainer(4), "devices": 2, "strategy": "ddp_find_unused_parameters_true"},
                       "data": {"batch_size": 4}, "model": {"restarts": 2, "warmup_steps": 1, "arch_lr": 0.5}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = run_pipeline(path, tmp_path / "run", stages=("bmtas",))
    ckpt = torch.load(run_dir / "bmtas" / "final.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    record = ckpt["dymu"]["bmtas"]["restarts"]
    best = record["selected"]
    assert len(record["objectives"]) == 2 and record["objectives"][best] == min(record["objectives"])
    assert ckpt["dymu"]["bmtas"]["routing"] == record["routings"][best]
    for prefix in ("model", "restart_models.0"):  # both searches moved their routing logits
        assert ckpt["state_dict"][f"{prefix}.logits"].abs().sum() > 0
