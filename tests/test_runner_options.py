"""``dymu run`` options: --set overrides, --data_root, the per-stage configs written by ``dymu configs``, and the
paper configs' baseline sections passing the runner's check before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import stages.runner
from stages.cli import entry_point
from stages.common import build_data
from stages.graph import STAGES, order
from stages.pipeline import PipelineConfigError, apply_override, load_pipeline_config
from stages.runner import check_before_training, stage_config, write_stage_configs

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = sorted((ROOT / "configs").glob("*/pipeline*.yaml"))


def test_overrides_set_nested_values_parsed_as_yaml() -> None:
    config = {"anchor": {"trainer": {"devices": 1}}, "data": {"init_args": {"root": "a"}}}
    out = config
    for item in ("anchor.trainer.devices=4", "data.init_args.tasks=[semseg, depth]", "edge.model.tau=0.2"):
        out = apply_override(out, item)
    assert out["anchor"]["trainer"]["devices"] == 4
    assert out["data"]["init_args"]["tasks"] == ["semseg", "depth"]
    assert out["edge"]["model"]["tau"] == 0.2
    assert config["anchor"]["trainer"]["devices"] == 1, "the input config must not change"


@pytest.mark.parametrize("item, match", [("anchor.trainer.devices", "dotted.key=value"),
                                         ("=3", "dotted.key=value"),
                                         ("seed_everything.x=1", "is not a section")])
def test_bad_overrides_are_named(item: str, match: str) -> None:
    with pytest.raises(PipelineConfigError, match=match):
        apply_override({"seed_everything": 0}, item)


def test_data_root_and_unknown_override_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"data": {"class_path": "x", "init_args": {}}, "backbone": {"class_path": "y"}}))
    config = load_pipeline_config(path, data_root="/data/NYUD_MT")
    assert config.data["init_args"]["root"] == "/data/NYUD_MT"
    with pytest.raises(ValueError, match="--set anchor.optimizer=1: unknown key 'anchor.optimizer'"):
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
                        "--run_dir", config.run_dir]) == 0
    # the baselines' sections write nothing by default: only the pipeline's own stages
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "anchor.yaml", "edge.yaml", "weight.yaml"]
    for stage in ("anchor", "edge", "weight"):
        committed = yaml.safe_load((ROOT / "configs" / dataset / f"{stage}.yaml").read_text())
        assert committed == yaml.safe_load((tmp_path / f"{stage}.yaml").read_text()), (
            f"configs/{dataset}/{stage}.yaml is stale: regenerate it with `dymu configs --config {pipeline} "
            f"--out configs/{dataset} --run_dir {config['run_dir']}`")
        assert committed == stage_config(config, stage, Path(config.run_dir))


BASELINES = ("shared_mtl", "phn", "phn_bn", "static", "ltb", "bmtas", "feature_partitioning")


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_paper_baseline_sections_pass_the_check_before_training(path: Path, tmp_path: Path, monkeypatch) -> None:
    """Every baseline section of a paper config is parsed and type-checked by its stage's LightningCLI (as
    ``dymu run --stages ...`` does before training), asks for the GPU its stage would train on, and trains for
    a set number of steps; the data set on disk and the GPU itself are not looked for here."""
    config = load_pipeline_config(path)
    present = tuple(s for s in BASELINES if config.has_section(s))
    expected = set(BASELINES) - ({"bmtas", "feature_partitioning"} if "cifar100" in path.parts else set())
    assert set(present) == expected
    monkeypatch.setattr(type(build_data(config.data)), "check_data", lambda self: None)
    asked: dict[str, str] = {}
    monkeypatch.setattr(stages.runner, "check_accelerator",
                        lambda stage, cfg: asked.setdefault(stage, cfg["trainer"]["accelerator"]))
    configs = check_before_training(config, tmp_path / "run", order(present))
    static = [folder for folder, _ in STAGES["static"].instances(config)]
    assert sorted(configs) == sorted(["anchor", *(s for s in present if s != "static"), *static])
    assert len(static) == 20 and asked == {**dict.fromkeys(["anchor", *present], "gpu"), "evaluate": "cuda"}
    for folder, stage_cfg in configs.items():
        trainer = stage_cfg["trainer"]
        assert trainer["precision"] == config.section("anchor").trainer["precision"] == "bf16-mixed", folder
        assert (trainer.get("max_steps") or -1) > 0 or trainer.get("max_epochs"), folder
    hypernet_steps = config.section("weight").trainer["max_steps"]
    assert configs["phn"]["trainer"]["max_steps"] == configs["phn_bn"]["trainer"]["max_steps"] == hypernet_steps
    for key in ("max_steps", "max_epochs"):  # a static network trains as long as one anchor stream
        assert configs["static/p00"]["trainer"].get(key) == configs["shared_mtl"]["trainer"].get(key) \
            == config.section("anchor").trainer.get(key)


def test_configs_writes_the_stages_asked_for(tmp_path: Path) -> None:
    pipeline = ROOT / "configs" / "pascal_context" / "pipeline_3tasks.yaml"
    config = load_pipeline_config(pipeline)
    assert entry_point(["configs", "--config", str(pipeline), "--out", str(tmp_path), "--run_dir", "runs/p3",
                        "--stages", "static", "phn"]) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml"))
    assert written == ["phn.yaml", *(f"static/p{k:02d}.yaml" for k in range(20))]
    for folder, model_args in [("phn", {}), *STAGES["static"].instances(config)]:
        text = (tmp_path / f"{folder}.yaml").read_text()
        assert "--stages static phn`" in text.splitlines()[0]
        assert yaml.safe_load(text) == stage_config(config, folder.split("/")[0], "runs/p3", folder=folder,
                                                    model_args=model_args)
    with pytest.raises(ValueError, match="computed steps"):
        write_stage_configs(config, tmp_path, "runs/p3", stages=("affinity",))
    config = config.with_overrides(["ltb=null"])
    with pytest.raises(ValueError, match=r"no trainer settings for the stages \['ltb'\]"):
        write_stage_configs(config, tmp_path / "x", "runs/p3", stages=("ltb",))
    assert not (tmp_path / "x").exists()


def test_an_override_of_one_stage_leaves_stages_sharing_a_yaml_anchor_alone() -> None:
    config = load_pipeline_config(ROOT / "configs" / "nyuv2" / "pipeline.yaml",
                                  ["weight.model.optimizer.init_args.lr=0.5"])
    assert config.values["weight"]["model"]["optimizer"]["init_args"]["lr"] == 0.5
    assert config.values["edge"]["model"]["optimizer"]["init_args"]["lr"] != 0.5
