"""``dymu run`` options: --set overrides, --data_root, and the per-stage configs written by ``dymu configs``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.cli import entry_point
from stages.runner import apply_overrides, load_pipeline_config, stage_config

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = sorted((ROOT / "configs").glob("*/pipeline*.yaml"))


def test_overrides_set_nested_values_parsed_as_yaml() -> None:
    config = {"anchor": {"trainer": {"devices": 1}}, "data": {"init_args": {"root": "a"}}}
    out = apply_overrides(config, ["anchor.trainer.devices=4", "data.init_args.tasks=[semseg, depth]",
                                   "edge.model.tau=0.2"])
    assert out["anchor"]["trainer"]["devices"] == 4
    assert out["data"]["init_args"]["tasks"] == ["semseg", "depth"]
    assert out["edge"]["model"]["tau"] == 0.2
    assert config["anchor"]["trainer"]["devices"] == 1, "the input config must not change"


@pytest.mark.parametrize("item, match", [("anchor.trainer.devices", "dotted.key=value"),
                                         ("=3", "dotted.key=value"),
                                         ("seed_everything.x=1", "is not a section")])
def test_bad_overrides_are_named(item: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_overrides({"seed_everything": 0}, [item])


def test_data_root_and_unknown_override_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"data": {"class_path": "x", "init_args": {}}, "backbone": {}}))
    config = load_pipeline_config(path, data_root="/data/NYUD_MT")
    assert config["data"]["init_args"]["root"] == "/data/NYUD_MT"
    with pytest.raises(ValueError, match="unknown keys"):
        load_pipeline_config(path, ["anchor.optimizer=1"])


def test_paper_pipeline_configs_exist() -> None:
    names = {p.relative_to(ROOT / "configs").as_posix() for p in PAPER_CONFIGS}
    assert {"pascal_context/pipeline.yaml", "pascal_context/pipeline_3tasks.yaml", "nyuv2/pipeline.yaml",
            "cifar100/pipeline.yaml"} <= names


@pytest.mark.parametrize("dataset", ["pascal_context", "nyuv2", "cifar100"])
def test_committed_stage_configs_are_the_pipelines(dataset: str, tmp_path: Path) -> None:
    """configs/<dataset>/{anchor,edge,weight}.yaml are what `dymu configs` writes from the pipeline config,
    so running stages by hand trains exactly what `dymu run` trains."""
    pipeline = ROOT / "configs" / dataset / "pipeline.yaml"
    config = load_pipeline_config(pipeline)
    assert entry_point(["configs", "--config", str(pipeline), "--out", str(tmp_path),
                        "--run_dir", config["run_dir"]]) == 0
    for stage in ("anchor", "edge", "weight"):
        committed = yaml.safe_load((ROOT / "configs" / dataset / f"{stage}.yaml").read_text())
        assert committed == yaml.safe_load((tmp_path / f"{stage}.yaml").read_text()), (
            f"configs/{dataset}/{stage}.yaml is stale: regenerate it with `dymu configs --config {pipeline} "
            f"--out configs/{dataset} --run_dir {config['run_dir']}`")
        assert committed == stage_config(config, stage, Path(config["run_dir"]))
