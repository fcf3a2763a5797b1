"""The typed pipeline config (stages/pipeline.py): parsed once, every section typed, ``--set`` through the same
parser at any depth, nothing added that the user did not write, one-line errors with the key's path."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from stages.evaluate import EVALUATE_SKIP, evaluate_run
from stages.graph import STAGES, RetrainSection, StageSection, StaticSection
from stages.pipeline import PipelineConfig, PipelineConfigError, evaluation_options, load_pipeline_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "synthetic_regression.yaml",
           *sorted((ROOT / "configs").glob("*/pipeline*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_a_shipped_config_is_recorded_exactly_as_written(path: Path) -> None:
    """What a run records (and its stage configs and lineage hashes are made of) is the file's content: the
    parser adds no default (an optimizer's betas, the evaluation's options)."""
    raw = yaml.safe_load(path.read_text())
    config = load_pipeline_config(path)
    assert config.values == raw
    assert yaml.safe_load(yaml.safe_dump(config.values)) == raw  # and YAML can write it
    assert raw == yaml.safe_load(path.read_text()), "parsing must not change what it was given"


def test_sections_are_typed_with_the_defaults_of_their_dataclass() -> None:
    config = load_pipeline_config(ROOT / "configs" / "quickstart.yaml", ["static=null", "retrain=null"])
    assert type(config.section("anchor")) is StageSection and config.section("anchor").trainer["max_steps"] == 500
    assert isinstance(config.section("static"), StaticSection) and config.section("static").count == 20
    assert isinstance(config.section("retrain"), RetrainSection)
    assert config.section("retrain").inits == ["anchor", "scratch"] and not config.has_section("static")
    assert set(config.sections) == {name for name, stage in STAGES.items() if stage.trained}
    # the evaluation's options: evaluate_run's defaults, except what the file sets
    defaults = {name: p.default for name, p in inspect.signature(evaluate_run).parameters.items()
                if name not in EVALUATE_SKIP}
    assert set(config.evaluate) == set(defaults)
    assert config.evaluate["budgets"] == [1.0, 0.8, 0.6, 0.5] and config.evaluate["num_cost_preferences"] == 1000
    assert config.evaluate["device"] == defaults["device"] and config.evaluate_given()["seed"] == 0


def test_set_reaches_any_depth_and_is_typed_by_the_parser() -> None:
    config = load_pipeline_config(ROOT / "configs" / "quickstart.yaml", [
        "anchor.trainer.logger={class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: x}}",
        "anchor.trainer.logger.init_args.name=deep",
        "data.init_args.root=/data/x",  # jsonargparse's own dotted syntax would set data['root'] here
        "static.count='3'",  # a string that is an int
        "evaluate.budgets=[1, 0.5]",
        "affinity={num_images: 8}",
    ])
    assert config.values["anchor"]["trainer"]["logger"]["init_args"] == {"save_dir": "x", "name": "deep"}
    assert config.data["init_args"]["root"] == "/data/x" and "root" not in config.data
    assert config.section("static").count == 3 and config.values["static"]["count"] == 3
    assert type(config.values["static"]["count"]) is int  # a plain int, which YAML writes
    assert config.evaluate["budgets"] == [1.0, 0.5] and config.affinity.num_images == 8 and config.affinity.seed == 0
    # an override of one stage leaves another that shared its YAML anchor alone
    shared = load_pipeline_config(ROOT / "configs" / "nyuv2" / "pipeline.yaml", ["weight.model.optimizer.init_args.lr=0.5"])
    assert shared.values["edge"]["model"]["optimizer"]["init_args"]["lr"] != 0.5


@pytest.mark.parametrize("override, message", [
    ("anchr.trainer.max_steps=3", "--set anchr.trainer.max_steps=3: unknown key 'anchr' (did you mean 'anchor'?)"),
    ("anchor.traner={}", "unknown key 'anchor.traner' (did you mean 'trainer'?)"),
    ("seed_everything=a", "key 'seed_everything': expected an int, got a"),
    ("run_dir=3", "key 'run_dir': expected a string, got 3"),
    ("static.count=x", "key 'static.count': expected a positive int, got 'x'"),
    ("evaluate.budgets=0.5", "key 'evaluate.budgets': expected a list, got 0.5"),
    ("evaluate.reference_point=[a]", "key 'evaluate.reference_point': expected a number"),
    ("evaluate.budget_metric=gflops", "key 'evaluate.budget_metric': expected one of 'params', 'flops', got gflops"),
    ("anchor.trainer=3", "key 'anchor.trainer': expected a mapping, got 3"),
    ("anchor=3", "key 'anchor': expected a mapping of its settings, got 3"),
    ("data.init_arg={}", "key 'data': unknown keys {'init_arg'}"),
    ("logger.x=1", "key 'logger': expected true or false or a class_path mapping"),
    ("backbone=null", "missing required section backbone"),
    ("seed_everything.x=1", "'seed_everything' is not a section"),
    ("anchor.trainer.devices", "must look like dotted.key=value"),
    ("anchor.trainer=[1, 2", "its value is not valid YAML"),
])
def test_every_error_is_one_line_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(PipelineConfigError) as err:
        load_pipeline_config(ROOT / "configs" / "quickstart.yaml", [override])
    text = str(err.value)
    assert message in text and "\n" not in text and len(text) < 400, text


def test_a_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    raw["edge"]["trainr"] = {"max_steps": 3}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineConfigError, match=f"^{path}: unknown key 'edge.trainr'"):
        load_pipeline_config(path)
    path.write_text("- a list\n")
    with pytest.raises(PipelineConfigError, match="must hold a YAML mapping"):
        load_pipeline_config(path)


def test_evaluation_options_are_checked_and_completed_by_the_same_section_parser() -> None:
    options = evaluation_options({"seed": 3, "device": "cuda"})
    assert options["seed"] == 3 and options["num_preferences"] == 20 and "device" not in options
    with pytest.raises(PipelineConfigError, match="unknown key 'num_prefs' \\(did you mean 'num_preferences'\\?\\)"):
        evaluation_options({"num_prefs": 3})
    assert PipelineConfig.parse(yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text()),
                                "q").scored_evaluation() == evaluation_options({"budgets": [1.0, 0.8, 0.6, 0.5]})
