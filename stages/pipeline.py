"""The pipeline config, parsed once into a typed ``PipelineConfig``.

One jsonargparse parser holds every key the pipeline defines: the top level (``run_dir``, ``seed_everything``,
``data``, ``backbone``, ``logger``), the ``evaluate`` section (typed by ``stages.evaluate.evaluate_run``'s
signature), the ``affinity`` section and one section per training stage of the stage table (its
``Stage.section`` dataclass: ``trainer``, ``model``, ``checkpoint``, ``data``, and ``count`` or ``trees`` /
``inits`` for a repeated stage). ``--set key=value`` overrides go through the same parser: each one is applied to
the mapping (its value read as YAML, at any depth: ``anchor.trainer.logger.init_args.project=x``) and the result
parsed again, so an override is checked exactly as the file's own entries and an error names it. Every error is
one line with the key's path and the expected type.

What each stage's ``trainer``, ``model`` and ``data`` entries mean is typed by that stage's own LightningCLI
(``stages.stage_cli.check_stage_config``, run by ``dymu run`` before anything trains), which knows the
LightningModule's and the Trainer's arguments; this parser checks their shape.

The runner, the evaluation, ``dymu compare``, the sweeps and ``dymu info`` take the parsed object; the YAML is
read once per command (a run's own ``pipeline.yaml`` when the command starts from a run directory).
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml

from stages.common import load_yaml_file, write_yaml
from stages.graph import STAGES, AffinitySection, ClassSpec, StageSection

TOP_LEVEL = ("run_dir", "seed_everything", "data", "backbone", "logger", "evaluate", "affinity")
"""The pipeline config's top-level keys besides the training stages' sections."""


class PipelineConfigError(ValueError):
    """A pipeline config (or a ``--set`` override) that the parser refuses; its message is one line."""


def _add_evaluate(parser: Any, key: str = "evaluate") -> None:
    from stages.evaluate import EVALUATE_SKIP, evaluate_run

    parser.add_function_arguments(evaluate_run, key, skip=set(EVALUATE_SKIP))


@functools.cache
def pipeline_parser() -> Any:
    """The parser of the whole pipeline config (built once per process)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, prog="pipeline config")
    parser.add_argument("--run_dir", type=str | None, default=None)
    parser.add_argument("--seed_everything", type=int, default=0)
    parser.add_argument("--data", type=ClassSpec, required=True)
    parser.add_argument("--backbone", type=ClassSpec, required=True)
    parser.add_argument("--logger", type=Union[bool, ClassSpec, None], default=None)  # noqa: UP007
    _add_evaluate(parser)
    parser.add_class_arguments(AffinitySection, "affinity")
    for name, stage in STAGES.items():
        if stage.trained:
            parser.add_class_arguments(stage.section, name)
    return parser


@functools.cache
def _evaluate_parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    _add_evaluate(parser)
    return parser


@functools.cache
def section_keys(name: str) -> list[str]:
    """The keys a section of the pipeline config takes, as its parser has them (``evaluate``: ``evaluate_run``'s
    options)."""
    return [key for key in pipeline_parser().get_defaults().as_dict()[name] if not key.startswith("__")]


def known_keys() -> list[str]:
    return [*TOP_LEVEL, *(name for name, stage in STAGES.items() if stage.trained)]


SECTIONS = ("evaluate", "affinity")


def _check_shape(values: dict[str, Any]) -> None:
    """Unknown keys (with the likely meant one) and sections that are not mappings. The parser itself lets an
    unknown key with an empty value (``traner: {}``) pass, and a scalar where a section belongs."""
    for key in values:
        if key not in known_keys():
            raise PipelineConfigError(f"unknown key '{key}'{_did_you_mean(key, known_keys())}; the top-level keys are "
                                      f"{', '.join(known_keys())}")
    for name in (*SECTIONS, *(n for n in known_keys() if n in STAGES)):
        section = values.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise PipelineConfigError(f"key '{name}': expected a mapping of its settings, got {section!r}")
        allowed = section_keys(name)
        for key in section:
            if key not in allowed:
                raise PipelineConfigError(f"unknown key '{name}.{key}'{_did_you_mean(key, allowed)}; the section takes "
                                          f"{', '.join(allowed)}")


def _did_you_mean(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def error_line(message: str, prefix: str = "") -> str:
    """jsonargparse's error as one line: the key's path (after ``prefix``, e.g. a stage's ``edge.``), what it
    expects and what it got."""
    message = " ".join(message.split())
    unknown = re.search(r"Group '([\w.]+)' does not accept option '([\w]+)", message) or \
        re.search(r"Option '([\w]+)(?:\.([\w]+))?[\w.]*' is not accepted", message) or \
        re.search(r"Key '([\w.]+)' is not expected", message)
    if unknown:
        return f"unknown key '{prefix}{'.'.join(g for g in unknown.groups() if g)}'"
    keys = re.findall(r'Parser key "([\w.]+)"', message)
    if keys:
        key = prefix + keys[0]
        rest = message.split(f'Parser key "{keys[0]}":', 1)[1].strip()
        nested = re.search(r'Parser key "([\w.]+)": (.*?)(?: - Expected a <class .NoneType.>|$)', rest)
        if nested:  # a section's own key, inside the union with None
            key, rest = f"{key}.{nested.group(1)}", nested.group(2)
        if rest.startswith("Does not validate against any of the Union subtypes"):
            return f"key '{key}': {_union_error(rest)}"
        expected = re.match(r"Expected a (.+?)\. Got value: (.*)", rest)
        if expected:
            return f"key '{key}': expected {_kind(expected.group(1))}, got {expected.group(2)}"
        restriction = re.match(r"Not of type (\w+): (.*)", rest)
        if restriction:
            got = restriction.group(2)
            got = re.sub(r"^(.*) does not conform to restriction .*$", r"\1", got)
            got = re.sub(r"^invalid literal for \w+\(\) with base \d+: (.*)$", r"\1", got)
            return f"key '{key}': expected {_restriction(restriction.group(1))}, got {got}"
        unexpected = re.match(r"Unexpected keys: (\{.*?\})", rest)
        if unexpected:
            return f"key '{key}': unknown keys {unexpected.group(1)}; it takes class_path and init_args"
        missing = re.search(r"Missing required keys?: (\[.*?\]|\{.*?\}|[\w']+)", rest)
        if missing:
            return f"key '{key}': missing {missing.group(1)}"
        return f"key '{key}': {rest[:300]}"
    required = re.search(r'Key "([\w.]+)" is required', message)
    if required:
        return f"key '{prefix}{required.group(1)}' is required"
    return message[:300]


def _kind(text: str) -> str:
    """A type as jsonargparse names it (``<class 'int'>``, ``typing.Literal['a', 'b']``), in words."""
    text = text.strip().removesuffix(".").replace("typing.", "")
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    name = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    words = {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false", "dict": "a mapping",
             "list": "a list", "Sequence": "a list", "NoneType": "null"}
    return words.get(name.group(1), name.group(1)) if name else text


def _union_error(rest: str) -> str:
    """jsonargparse's error for a value that fits none of a union's types, in words: what each type wanted."""
    errors = rest.split("Errors:", 1)[-1].split("Given value type:")[0]
    given = re.search(r"Given value: (.*)$", rest)
    kinds, problems = [], []
    for item in (part.strip() for part in errors.split(" - ") if part.strip()):
        expected = re.match(r"Expected a (.+?)(?:\. Got value: .*)?$", item)
        if expected:
            if "NoneType" not in expected.group(1):
                kinds.append(_kind(expected.group(1)))
        elif item.startswith("Missing required keys"):
            kinds.append("a class_path mapping")
            problems.append("it has no " + item.split(":", 1)[-1].strip())
        else:
            problems.append(item)
    said = f"expected {' or '.join(kinds) or 'another type'}" + (f" ({problems[0]})" if problems else "")
    return said + (f", got {given.group(1)}" if given else "")


def _restriction(name: str) -> str:
    return {"PositiveInt": "a positive int", "NonNegativeInt": "an int >= 0",
            "PositiveFloat": "a positive number"}.get(name, name)


def apply_override(values: dict[str, Any], item: str) -> dict[str, Any]:
    """A copy of ``values`` with one ``dotted.key=value`` override set (the value read as YAML). Each top-level
    section is copied on its own, so sections that share a YAML anchor stop sharing it."""
    values = {key: copy.deepcopy(value) for key, value in values.items()}
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise PipelineConfigError(f"--set {item!r} must look like dotted.key=value, e.g. anchor.trainer.devices=4")
    *parents, leaf = key.split(".")
    node = values
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise PipelineConfigError(f"--set {item!r}: '{'.'.join(parents[:depth + 1])}' is not a section (it holds "
                                      f"{child!r})")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PipelineConfigError(f"--set {item!r}: its value is not valid YAML ({problem}); quote it, e.g. "
                                  f"--set '{key}=\"{raw}\"'") from None
    return values


def _given(parsed: Any, given: Any) -> Any:
    """The parsed (typed) values of the keys that ``given`` holds: no default is added, so the config that a run
    records and the stage configs made from it hold only what the user wrote (a number given as ``"3"`` for an int
    becomes 3)."""
    if isinstance(given, dict) and isinstance(parsed, dict):
        return {k: _given(parsed.get(k, v), v) for k, v in given.items()}
    if isinstance(given, list) and isinstance(parsed, (list, tuple)) and len(given) == len(parsed):
        return [_given(p, g) for p, g in zip(parsed, given)]
    for plain in (bool, int, float, str):  # a restricted type (PositiveInt) as its plain one, which YAML writes
        if isinstance(parsed, plain):
            return plain(parsed)
    return None if parsed is None else given


def _section(built: StageSection, given: dict[str, Any]) -> StageSection:
    """A stage's section with the entries the user gave as given (the parser fills a ``class_path`` mapping
    inside ``model`` with its class's defaults) and the typed ones (``count``) as parsed."""
    return type(built)(**{**{f.name: getattr(built, f.name) for f in fields(built)}, **given})


@dataclass(frozen=True)
class PipelineConfig:
    """A checked pipeline config.

    Attributes:
        values: the config as given (``--set`` applied), each value as parsed: what ``pipeline.yaml`` records and
            what the stage configs are made of. Keys the user left out are absent (their defaults apply where
            they are read).
        source: where it came from (a file; ``dymu run``'s default run directory is ``runs/<its stem>``).
        seed_everything, run_dir, data, backbone, logger: the top-level entries (``logger`` None: the default).
        evaluate: ``evaluate_run``'s options with their defaults, as typed by its signature.
        affinity: the affinity step's options.
        sections: every training stage's section (``Stage.section``), defaults where the config has none.
    """

    values: dict[str, Any]
    source: str
    seed_everything: int
    run_dir: str | None
    data: dict[str, Any]
    backbone: dict[str, Any]
    logger: Any
    evaluate: dict[str, Any]
    affinity: AffinitySection
    sections: dict[str, StageSection] = field(repr=False)

    @classmethod
    def parse(cls, values: dict[str, Any], source: str | Path) -> PipelineConfig:
        """Check ``values`` and type them; a ``PipelineConfigError`` (one line, naming ``source``) otherwise."""
        if not isinstance(values, dict):
            raise PipelineConfigError(f"{source} must hold a YAML mapping at the top level")
        try:
            _check_shape(values)
            missing = [k for k in ("data", "backbone") if values.get(k) is None]
            if missing:
                raise PipelineConfigError(f"missing required section{'s' if len(missing) > 1 else ''} "
                                          f"{', '.join(missing)} (a class_path and its init_args)")
            parser = pipeline_parser()
            try:
                present = {k: v for k, v in values.items() if v is not None or k not in (*SECTIONS, *STAGES)}
                namespace = parser.parse_object(copy.deepcopy(present))  # the parser changes what it is given
                built = parser.instantiate_classes(namespace)
            except Exception as err:  # noqa: BLE001 - jsonargparse raises several types; one line with the key
                raise PipelineConfigError(error_line(str(err))) from None
        except PipelineConfigError as err:
            raise PipelineConfigError(f"{source}: {err}") from None
        plain = namespace.as_dict()
        given = _given(plain, values)
        evaluate = {k: v for k, v in plain["evaluate"].items() if not k.startswith("__")}
        sections = {name: _section(getattr(built, name), given.get(name) or {})
                    for name, stage in STAGES.items() if stage.trained}
        return cls(values=given, source=str(source), seed_everything=int(plain["seed_everything"]),
                   run_dir=plain["run_dir"], data=given["data"], backbone=given["backbone"], logger=given.get("logger"),
                   evaluate=evaluate, affinity=built.affinity, sections=sections)

    @classmethod
    def load(cls, path: str | Path, overrides: Iterable[str] = (), data_root: str | None = None) -> PipelineConfig:
        """Read a pipeline config file once, apply ``--data_root`` and the ``--set`` overrides, and check it."""
        values = load_yaml_file(path)
        if data_root is not None and isinstance(values, dict) and isinstance(values.get("data"), dict):
            values["data"].setdefault("init_args", {})["root"] = str(data_root)
        return cls.parse(values, path).with_overrides(overrides)

    def with_overrides(self, overrides: Iterable[str], source: str | None = None) -> PipelineConfig:
        """This config with ``dotted.key=value`` overrides, each checked by the parser (an error names it)."""
        overrides = list(overrides)
        if not overrides:
            return self
        values = self.values
        for item in overrides:
            values = apply_override(values, item)
        try:
            return PipelineConfig.parse(values, source or self.source)
        except PipelineConfigError:  # parse again after each override: the error names the one that broke it
            values = self.values
            for item in overrides:
                values = apply_override(values, item)
                try:
                    PipelineConfig.parse(values, source or self.source)
                except PipelineConfigError as err:
                    raise PipelineConfigError(f"--set {item}: {str(err).split(': ', 1)[-1]}") from None
            raise

    def with_sections(self, other: PipelineConfig, names: Iterable[str]) -> PipelineConfig:
        """This config with ``other``'s sections ``names`` added (``dymu compare --baselines_from``)."""
        values = {**self.values, **{name: copy.deepcopy(other.values[name]) for name in names}}
        return PipelineConfig.parse(values, self.source)

    def has_section(self, name: str) -> bool:
        """Whether the config has a section for stage ``name`` (a baseline runs only with one)."""
        return self.values.get(name) is not None

    def section(self, name: str) -> StageSection:
        return self.sections[name]

    def given(self, name: str) -> dict[str, Any]:
        """A section as the user wrote it (an empty mapping when absent)."""
        return copy.deepcopy(self.values.get(name) or {})

    def given_values(self) -> dict[str, Any]:
        """A copy of ``values``, to change and parse again."""
        return copy.deepcopy(self.values)

    def scored_evaluation(self) -> dict[str, Any]:
        """The evaluation options that change what it scores (``evaluation_options``)."""
        return evaluation_options(self.evaluate)

    def evaluate_given(self) -> dict[str, Any]:
        """The ``evaluate`` section's options as given (``evaluate_run`` fills the rest with its defaults)."""
        return self.given("evaluate")

    def write(self, path: str | Path) -> None:
        write_yaml(self.values, path)

    def default_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / Path(self.source).stem


def evaluation_options(options: dict[str, Any], where: str = "evaluate") -> dict[str, Any]:
    """``options`` (``evaluate_run``'s keyword arguments) checked by the ``evaluate`` section's parser and completed
    with their defaults, without those that change where it runs (``NOT_SCORED``): what an evaluation records it
    scored."""
    from stages.evaluate import NOT_SCORED

    if not isinstance(options, dict):
        raise PipelineConfigError(f"{where} must be a mapping of evaluate_run's options, got {options!r}")
    unknown = [k for k in options if k not in section_keys("evaluate")]
    if unknown:
        raise PipelineConfigError(f"{where}: unknown key '{unknown[0]}'{_did_you_mean(unknown[0], section_keys('evaluate'))}"
                                  f"; the options are {', '.join(section_keys('evaluate'))}")
    try:
        parsed = _evaluate_parser().parse_object({"evaluate": options}).as_dict()["evaluate"]
    except Exception as err:  # noqa: BLE001 - as in PipelineConfig.parse
        raise PipelineConfigError(f"{where}: {error_line(str(err))}") from None
    return {k: v for k, v in parsed.items() if k not in NOT_SCORED and not k.startswith("__")}


def load_pipeline_config(path: str | Path, overrides: Iterable[str] | None = None,
                         data_root: str | None = None) -> PipelineConfig:
    """``PipelineConfig.load``: read and check a pipeline config with ``--set`` overrides and ``--data_root``."""
    return PipelineConfig.load(path, overrides or (), data_root)


def run_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """The pipeline config a run directory records (``dymu run`` wrote it), read once and checked."""
    from dymu.layout import RunLayout

    layout = RunLayout(run_dir)
    if not layout.pipeline_config.is_file():
        raise FileNotFoundError(f"{layout.root} holds no {layout.pipeline_config.name}: pass a run directory written "
                                "by `dymu run`")
    return PipelineConfig.load(layout.pipeline_config, overrides)
