"""Typed results of ``dymu evaluate``, ``dymu compare`` and the sweeps: frozen dataclasses with enums, each with
``to_json()`` and ``from_json()``.

Code finds a record, a cost entry or a comparison row by its typed fields (``Method``, ``CostGroup``,
``CompareKind``, ``adaptation``, ``c``), never by its human-readable label. The labels (``"ours w/o adaptation,
c=1"``, ``"focused (max r >= 0.9), c=0"``) come from one renderer per type (:func:`method_label`,
:func:`cost_label`, :func:`compare_label`) and are written only where people read them: ``report.md``, the
figures and the display keys of the JSON (``inference_cost``'s keys, a comparison row's ``"method"``), which
keep today's text so that existing readers keep working.

``evaluation/metrics.json`` and ``compare/metrics.json`` carry ``schema_version`` (:data:`SCHEMA_VERSION`);
``from_json`` refuses a newer one in one line and reads an older one (see each ``from_json``).

Imports nothing heavy (no torch): ``dymu compare --help`` and the docs scripts stay fast.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from dymu.layout import COMPARE, METRICS

SCHEMA_VERSION = 2
"""Version of ``evaluation/metrics.json`` and ``compare/metrics.json``.

- 1 (no ``schema_version`` key): records found by their display labels.
- 2: ``schema_version`` at the top; each ``inference_cost`` entry has ``group`` and ``c`` (an empty group is an
  entry with ``count`` 0 and null means, where version 1 wrote null); each comparison row has ``kind``,
  ``adaptation`` and ``c`` (and ``networks``, the static row); each controllability row has ``focus`` (the task
  focused on, null for the uniform preference). Every key of version 1 is kept.
"""

FOCUSED_MIN_R = 0.9
"""A cost preference is focused when its largest task weight is at least this."""
NEAR_UNIFORM_FACTOR = 1.5
"""A cost preference is near-uniform when its largest task weight is at most this over N."""


class SchemaError(ValueError):
    """A results file written by a newer dymu (its ``schema_version`` above :data:`SCHEMA_VERSION`)."""


def check_schema(data: Mapping[str, Any], source: str | Path) -> int:
    """The ``schema_version`` of a results file's content (1 when it has none); a one-line ``SchemaError``
    naming ``source`` and both versions when it is newer than this code's."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SchemaError(f"{source}: schema_version must be a positive integer, got {version!r}; delete the file "
                          "and rerun the command that wrote it")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{source} has schema_version {version}, newer than this dymu reads ({SCHEMA_VERSION}): "
                          "update dymu, or delete the file and rerun the command that wrote it")
    return version


def _read(path: str | Path, fix: str, parse: Callable[[dict[str, Any], str | Path], Any]) -> Any:
    """``parse(content, path)`` of a results file; a malformed one (not JSON, not an object, a key missing) is a
    one-line ``ValueError`` naming it and ``fix``."""
    from stages.common import read_json

    data = read_json(path, fix)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object at the top level; {fix}")
    try:
        return parse(data, path)
    except SchemaError:
        raise
    except KeyError as err:
        raise ValueError(f"{path} lacks the entry {err}; {fix}") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is malformed ({' '.join(str(err).split())}); {fix}") from None


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _same(a: Any, b: Any) -> bool:
    """Equality that takes NaN to equal NaN (a trial's missing metric)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# --- the evaluation (evaluation/metrics.json) -------------------------------------------------------------------

class Method(StrEnum):
    """A method of the evaluation's records; the values are ``dymu.evaluation``'s variants' ``method`` strings
    (``ANCHOR.method``, ``TREE.method`` = ``ADAPTED.method``, ``RECALIBRATED.method``), ``adaptation`` tells
    ``TREE`` from ``ADAPTED``."""

    ANCHOR = "single-task anchor"
    DYMU = "dymu"
    RECALIBRATED = "dymu, recalibrated BN"

    @classmethod
    def of(cls, variant: Any) -> Method:
        """The method of a ``dymu.evaluation.Variant``."""
        return cls(variant.method)


def method_label(method: Method) -> str:
    """The renderer of a method's name in the report's tables."""
    return method.value


@dataclass(frozen=True)
class EvaluationRecord:
    """One method, adaptation and ``c`` of the evaluation: the front's hypervolume (and its algorithm), its
    ratio to the single-task anchor's at the same ``c``, uniformity, mean cost and the per-preference records
    (``r``, ``c``, tree, scaled losses, cost: plain JSON). A budget record (``budget`` not None) also has
    ``budget_metric``, ``max_fraction``, ``mean_fraction`` and ``within_budget``."""

    method: Method
    adaptation: bool
    c: float
    hypervolume: float
    hypervolume_method: str
    uniformity: float
    mean_params: float
    mean_gflops: float
    preferences: tuple[dict[str, Any], ...] = ()
    hypervolume_ratio: float | None = None
    budget: float | None = None
    budget_metric: str | None = None
    max_fraction: float | None = None
    mean_fraction: float | None = None
    within_budget: bool | None = None

    @classmethod
    def from_summary(cls, method: Method, adaptation: bool, c: float, summary: Mapping[str, Any],
                     preferences: Sequence[dict[str, Any]]) -> EvaluationRecord:
        """A record from ``dymu.evaluation.front_summary``'s dict and the ``preference_records``."""
        return cls(method=method, adaptation=adaptation, c=c, hypervolume=summary["hypervolume"],
                   hypervolume_method=summary["hypervolume_method"], uniformity=summary["uniformity"],
                   mean_params=summary["mean_params"], mean_gflops=summary["mean_gflops"],
                   preferences=tuple(preferences))

    def matches(self, method: Method, adaptation: bool | None = None, c: float | None = None) -> bool:
        """Whether this is ``method`` (with this ``adaptation`` and ``c`` where given)."""
        return (self.method is method and (adaptation is None or self.adaptation == adaptation)
                and (c is None or self.c == c))

    def to_json(self) -> dict[str, Any]:
        """Today's keys, in today's order (a budget record's budget keys around the common ones)."""
        head = {"budget": self.budget, "budget_metric": self.budget_metric} if self.budget is not None else {}
        out = {**head, "method": self.method.value, "adaptation": self.adaptation, "c": self.c,
               "hypervolume": self.hypervolume, "hypervolume_method": self.hypervolume_method,
               "hypervolume_ratio": self.hypervolume_ratio, "uniformity": self.uniformity,
               "mean_params": self.mean_params, "mean_gflops": self.mean_gflops,
               "preferences": list(self.preferences)}
        if self.budget is not None:
            out.update(max_fraction=self.max_fraction, mean_fraction=self.mean_fraction,
                       within_budget=self.within_budget)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationRecord:
        """A record of ``to_json`` (every schema version writes records alike; a record without
        ``hypervolume_ratio`` or ``preferences`` gets None or none)."""
        return cls(method=Method(data["method"]), adaptation=bool(data["adaptation"]), c=float(data["c"]),
                   hypervolume=data["hypervolume"], hypervolume_method=data["hypervolume_method"],
                   uniformity=data["uniformity"], mean_params=data["mean_params"], mean_gflops=data["mean_gflops"],
                   preferences=tuple(data.get("preferences") or ()), hypervolume_ratio=data.get("hypervolume_ratio"),
                   budget=_opt_float(data.get("budget")), budget_metric=data.get("budget_metric"),
                   max_fraction=data.get("max_fraction"), mean_fraction=data.get("mean_fraction"),
                   within_budget=data.get("within_budget"))


def with_ratios(records: Sequence[EvaluationRecord]) -> list[EvaluationRecord]:
    """Copies of ``records`` with ``hypervolume_ratio``: the hypervolume over the single-task anchor's at the
    same ``c`` (the anchor's own record gets 1); None where no anchor record has that ``c`` or the anchor's
    hypervolume is 0."""
    anchor_hv = {rec.c: rec.hypervolume for rec in records if rec.method is Method.ANCHOR}
    out = []
    for rec in records:
        base = anchor_hv.get(rec.c)
        out.append(replace(rec, hypervolume_ratio=rec.hypervolume / base if base else None))
    return out


class CostGroup(StrEnum):
    """The cost preferences an inference-cost entry averages over: every one, the focused ones (largest task
    weight at least ``FOCUSED_MIN_R``) or the near-uniform ones (at most ``NEAR_UNIFORM_FACTOR / N``)."""

    ALL = "all"
    FOCUSED = "focused"
    NEAR_UNIFORM = "near-uniform"

    def holds(self, max_r: float, n_tasks: int) -> bool:
        """Whether a preference whose largest task weight is ``max_r`` belongs to the group."""
        if self is CostGroup.FOCUSED:
            return max_r >= FOCUSED_MIN_R
        if self is CostGroup.NEAR_UNIFORM:
            return max_r <= NEAR_UNIFORM_FACTOR / n_tasks
        return True


@dataclass(frozen=True)
class CostSummary:
    """Mean inference parameters and GFLOPs of the pruned model over a group of the cost preferences at one
    ``c`` (None: each preference at its own ``c``). An empty group has ``count`` 0 and None means."""

    group: CostGroup
    c: float | None
    count: int
    mean_params: float | None = None
    mean_gflops: float | None = None

    @classmethod
    def of(cls, group: CostGroup, c: float | None, summary: Mapping[str, Any] | None) -> CostSummary:
        """From ``dymu.evaluation.cost_summary``'s dict (None: an empty group)."""
        if summary is None:
            return cls(group, c, 0)
        return cls(group, c, summary["count"], summary["mean_params"], summary["mean_gflops"])

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group.value, "c": self.c, "count": self.count, "mean_params": self.mean_params,
                "mean_gflops": self.mean_gflops}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None, key: str | None = None) -> CostSummary:
        """An entry of ``to_json``; an entry of schema version 1 (without ``group``, or null for an empty group)
        is read from its ``inference_cost`` key, ``key`` (the version-1 labels: ``all``, ``c=0``, ``focused
        (max r >= 0.9), c=0``, ``near-uniform (max r <= 0.50), c=1``)."""
        if data is not None and "group" in data:
            return cls(CostGroup(data["group"]), _opt_float(data["c"]), int(data["count"]), data.get("mean_params"),
                       data.get("mean_gflops"))
        if key is None:
            raise ValueError("an inference_cost entry without 'group' needs its key to be read")
        group, c = legacy_cost_key(key)
        if data is None:
            return cls(group, c, 0)
        return cls(group, c, int(data["count"]), data.get("mean_params"), data.get("mean_gflops"))


def legacy_cost_key(key: str) -> tuple[CostGroup, float | None]:
    """The group and ``c`` of a schema-version-1 ``inference_cost`` key (a fixed parser of the labels that
    version wrote, independent of :func:`cost_label`)."""
    if key == "all":
        return CostGroup.ALL, None
    match = re.fullmatch(r"(?:(focused|near-uniform) \(.*\), )?c=([-+0-9.eE]+)", key)
    if match is None:
        raise ValueError(f"unknown inference_cost entry {key!r}")
    return CostGroup(match.group(1) or "all"), float(match.group(2))


def cost_label(summary: CostSummary, n_tasks: int) -> str:
    """The renderer of a cost entry's label (the report's rows, the JSON's ``inference_cost`` keys)."""
    head = {CostGroup.ALL: "",
            CostGroup.FOCUSED: f"focused (max r >= {FOCUSED_MIN_R:g})",
            CostGroup.NEAR_UNIFORM: f"near-uniform (max r <= {NEAR_UNIFORM_FACTOR / n_tasks:.2f})"}[summary.group]
    if summary.c is None:
        return head or "all"
    return f"{head}, c={summary.c:g}" if head else f"c={summary.c:g}"


@dataclass(frozen=True)
class EvaluationResult:
    """``evaluation/metrics.json``: the typed records, budget records and inference costs, and the rest as
    plain JSON (the anchor's cost and losses, the controllability grid, the controller's calibration, what was
    scored, the figures)."""

    tasks: tuple[str, ...]
    reference_point: tuple[float, ...]
    reference_point_source: str
    num_test_samples: int
    anchor: dict[str, Any]
    control_params: int
    inference_cost: tuple[CostSummary, ...]
    controllability: tuple[dict[str, Any], ...]
    records: tuple[EvaluationRecord, ...]
    budget_records: tuple[EvaluationRecord, ...] = ()
    controller: dict[str, Any] | None = None
    scored: dict[str, Any] | None = None
    plots: dict[str, str] | None = None

    def record(self, method: Method, adaptation: bool | None = None, c: float | None = None
               ) -> EvaluationRecord | None:
        """The first record of ``method`` (with this ``adaptation`` and ``c`` where given), else None."""
        return next((rec for rec in self.records if rec.matches(method, adaptation, c)), None)

    def cost(self, group: CostGroup, c: float | None) -> CostSummary | None:
        """The inference-cost entry of ``group`` at ``c`` (None: the entry over every preference's own c)."""
        return next((s for s in self.inference_cost if s.group is group and s.c == c), None)

    def uniform_controllability(self) -> dict[str, Any] | None:
        """The controllability row of the uniform preference (``focus`` null; version 1: its label)."""
        def uniform(row: Mapping[str, Any]) -> bool:
            return row["focus"] is None if "focus" in row else row.get("preference") == "uniform"

        return next((row for row in self.controllability if uniform(row)), None)

    def to_json(self) -> dict[str, Any]:
        n = len(self.tasks)
        return {"schema_version": SCHEMA_VERSION, "tasks": list(self.tasks), "reference_point": list(self.reference_point),
                "reference_point_source": self.reference_point_source, "num_test_samples": self.num_test_samples,
                "anchor": self.anchor, "control_params": self.control_params,
                "inference_cost": {cost_label(s, n): s.to_json() for s in self.inference_cost},
                "controllability": list(self.controllability), "records": [r.to_json() for r in self.records],
                "budget_records": [r.to_json() for r in self.budget_records], "controller": self.controller,
                "scored": self.scored, "plots": self.plots}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str | Path = METRICS) -> EvaluationResult:
        """The content of ``evaluation/metrics.json`` (``source`` names it in errors). A ``schema_version`` newer
        than :data:`SCHEMA_VERSION` is a one-line ``SchemaError``; a file of version 1 is read by falling back to
        its labels where the structured fields are missing (:meth:`CostSummary.from_json`,
        :meth:`uniform_controllability`). ``budget_records``, ``controller``, ``scored`` and ``plots`` may be
        missing."""
        check_schema(data, source)
        return cls(tasks=tuple(data["tasks"]), reference_point=tuple(data["reference_point"]),
                   reference_point_source=data["reference_point_source"], num_test_samples=data["num_test_samples"],
                   anchor=data["anchor"], control_params=data["control_params"],
                   inference_cost=tuple(CostSummary.from_json(v, k) for k, v in (data.get("inference_cost") or {}).items()),
                   controllability=tuple(data.get("controllability") or ()),
                   records=tuple(EvaluationRecord.from_json(r) for r in data["records"]),
                   budget_records=tuple(EvaluationRecord.from_json(r) for r in data.get("budget_records") or ()),
                   controller=data.get("controller"), scored=data.get("scored"), plots=data.get("plots"))

    @classmethod
    def read(cls, path: str | Path, fix: str = "delete it and rerun `dymu evaluate`") -> EvaluationResult:
        """``from_json`` of a file; a malformed one is a one-line error naming it and ``fix``."""
        return _read(path, fix, cls.from_json)


# --- the comparison (compare/metrics.json) ------------------------------------------------------------------------

class CompareKind(StrEnum):
    """A row of ``dymu compare``'s table; the baselines' values are their stage names (``compare.BASELINES``)."""

    SINGLE_TASK = "single-task"
    PHN = "phn"
    PHN_BN = "phn_bn"
    STATIC = "static"
    OURS = "ours"


@dataclass(frozen=True)
class CompareRow:
    """One row of ``dymu compare``'s table. ``adaptation`` and ``c`` are set for ``OURS`` (None otherwise),
    ``networks`` (how many static networks) for ``STATIC``, ``stored_params`` for the baselines."""

    kind: CompareKind
    hypervolume: float
    hv_ratio: float | None
    uniformity: float | None
    params: float
    gflops: float
    control_params: int | None
    train_seconds: float | None
    adaptation: bool | None = None
    c: float | None = None
    networks: int | None = None
    stored_params: int | None = None

    def matches(self, kind: CompareKind, adaptation: bool | None = None, c: float | None = None) -> bool:
        return self.kind is kind and (adaptation is None or self.adaptation == adaptation) and (c is None or self.c == c)

    def to_json(self) -> dict[str, Any]:
        """Today's keys (``method`` the row's label, :func:`compare_label`) with ``kind``, ``adaptation`` and
        ``c`` after it (and ``networks``, the static row)."""
        out: dict[str, Any] = {"method": compare_label(self), "kind": self.kind.value, "adaptation": self.adaptation,
                               "c": self.c}
        if self.networks is not None:
            out["networks"] = self.networks
        out.update(hypervolume=self.hypervolume, hv_ratio=self.hv_ratio, uniformity=self.uniformity, params=self.params,
                   gflops=self.gflops, control_params=self.control_params)
        if self.stored_params is not None:
            out["stored_params"] = self.stored_params
        out["train_seconds"] = self.train_seconds
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CompareRow:
        """A row of ``to_json``; a row of schema version 1 (without ``kind``) is read from its ``method`` label
        (:func:`legacy_compare_label`)."""
        if "kind" in data:
            kind, adaptation, c, networks = (CompareKind(data["kind"]), data.get("adaptation"), _opt_float(data.get("c")),
                                             data.get("networks"))
        else:
            kind, adaptation, c, networks = legacy_compare_label(data["method"])
        return cls(kind=kind, hypervolume=data["hypervolume"], hv_ratio=data.get("hv_ratio"),
                   uniformity=data.get("uniformity"), params=data["params"], gflops=data["gflops"],
                   control_params=data.get("control_params"), train_seconds=data.get("train_seconds"),
                   adaptation=adaptation, c=c, networks=networks, stored_params=data.get("stored_params"))


def legacy_compare_label(label: str) -> tuple[CompareKind, bool | None, float | None, int | None]:
    """Kind, adaptation, ``c`` and static networks of a schema-version-1 row's ``method`` (a fixed parser of
    the labels that version wrote, independent of :func:`compare_label`)."""
    fixed = {"single-task": CompareKind.SINGLE_TASK, "PHN": CompareKind.PHN, "PHN-BN": CompareKind.PHN_BN}
    if label in fixed:
        return fixed[label], None, None, None
    static = re.fullmatch(r"static \((\d+) networks\)", label)
    if static:
        return CompareKind.STATIC, None, None, int(static.group(1))
    ours = re.fullmatch(r"ours( w/o adaptation)?, c=([-+0-9.eE]+)", label)
    if ours:
        return CompareKind.OURS, ours.group(1) is None, float(ours.group(2)), None
    raise ValueError(f"unknown comparison row {label!r}")


def compare_label(row: CompareRow) -> str:
    """The renderer of a comparison row's label (the report, figure 6, the JSON's ``method``)."""
    if row.kind is CompareKind.OURS:
        return f"ours{'' if row.adaptation else ' w/o adaptation'}, c={row.c:g}"
    if row.kind is CompareKind.STATIC:
        return f"static ({row.networks} networks)"
    return {CompareKind.SINGLE_TASK: "single-task", CompareKind.PHN: "PHN", CompareKind.PHN_BN: "PHN-BN"}[row.kind]


@dataclass(frozen=True)
class ComparisonResult:
    """``compare/metrics.json``: the typed rows, and the rest as plain JSON (figure 6's static curve and match,
    the baselines' per-preference records, the architecture evaluation, the figure's file)."""

    tasks: tuple[str, ...]
    reference_point: tuple[float, ...]
    preferences: int
    rows: tuple[CompareRow, ...]
    static_curve: list[dict[str, Any]] | None = None
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    static_match: dict[str, Any] | None = None
    architectures: dict[str, Any] | None = None
    plot: str | None = None

    def row(self, kind: CompareKind, adaptation: bool | None = None, c: float | None = None) -> CompareRow | None:
        """The first row of ``kind`` (with this ``adaptation`` and ``c`` where given), else None."""
        return next((r for r in self.rows if r.matches(kind, adaptation, c)), None)

    def to_json(self) -> dict[str, Any]:
        out = {"schema_version": SCHEMA_VERSION, "tasks": list(self.tasks), "reference_point": list(self.reference_point),
               "preferences": self.preferences, "rows": [r.to_json() for r in self.rows],
               "static_curve": self.static_curve, "records": self.records, "static_match": self.static_match}
        if self.architectures is not None:
            out["architectures"] = self.architectures
        out["plot"] = self.plot
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str | Path = f"{COMPARE}/{METRICS}") -> ComparisonResult:
        """The content of ``compare/metrics.json`` (``source`` names it in errors). A ``schema_version`` newer
        than :data:`SCHEMA_VERSION` is a one-line ``SchemaError``; the rows of a version-1 file are read from
        their labels (:meth:`CompareRow.from_json`)."""
        check_schema(data, source)
        return cls(tasks=tuple(data["tasks"]), reference_point=tuple(data["reference_point"]),
                   preferences=data["preferences"], rows=tuple(CompareRow.from_json(r) for r in data["rows"]),
                   static_curve=data.get("static_curve"), records=data.get("records") or {},
                   static_match=data.get("static_match"), architectures=data.get("architectures"),
                   plot=data.get("plot"))

    @classmethod
    def read(cls, path: str | Path, fix: str = "delete it and rerun `dymu compare`") -> ComparisonResult:
        """``from_json`` of a file; a malformed one is a one-line error naming it and ``fix``."""
        return _read(path, fix, cls.from_json)


# --- a sweep trial (sweeps/<trial>/trial.json's metrics) ----------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TrialMetrics:
    """A sweep trial's columns (``stages.sweep.METRIC_COLUMNS`` holds their labels): hypervolume over the
    anchor's, uniformity and parameter fractions of the anchor's. NaN where the evaluation lacks the record
    (no adapted record without a weight stage) or the cost group is empty."""

    hv_ratio_c0: float = math.nan
    hv_ratio_c1: float = math.nan
    hv_ratio_c0_noadapt: float = math.nan
    hv_ratio_c1_noadapt: float = math.nan
    uniformity_c0: float = math.nan
    uniformity_c1: float = math.nan
    uniformity_anchor: float = math.nan
    params_c0: float = math.nan
    params_c1: float = math.nan
    params_ratio: float = math.nan
    focused_c0: float = math.nan
    focused_c1: float = math.nan
    near_uniform_c0: float = math.nan
    near_uniform_c1: float = math.nan
    uniform_c0: float = math.nan
    uniform_c1: float = math.nan

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def value(self, name: str) -> float:
        return float(getattr(self, name))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrialMetrics):
            return NotImplemented
        return all(_same(self.value(n), other.value(n)) for n in self.names())

    def to_json(self) -> dict[str, float]:
        return {name: self.value(name) for name in self.names()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrialMetrics:
        """A trial's ``metrics`` (a name it lacks, from an older trial, is NaN; names it has beyond these are
        ignored)."""
        return cls(**{name: float(data[name]) for name in cls.names() if data.get(name) is not None})


def parse_all(items: Iterable[Any], parse: Callable[[Mapping[str, Any]], Any]) -> list[Any]:
    """``parse`` of each item that is not already parsed (JSON dicts or typed objects alike)."""
    return [item if not isinstance(item, Mapping) else parse(item) for item in items]
