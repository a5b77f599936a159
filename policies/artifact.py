"""The policy artifact, typed: one class (PolicyArtifact) and one loader (parse_artifact).

`calibration/artifact.py` writes artifacts; the proxy, its reload and `cascade evaluate` read
them here, so a missing, edited, foreign or malformed file is refused with a message that
names the key (`policy artifact policy.json: nodes[1].cost_usd: expected a number`), and
everything past the loader reads attributes, never the JSON. The JSON object itself stays
in `PolicyArtifact.data`: the content hash is computed over it, unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies.difficulty import DIM, DifficultyModel
from policies.errors import InvalidInput
from policies.lengthcal import NodeCalibrator, calibrator_from
from policies.policy import CascadePolicy, StateTables
from policies.posterior import AGREEMENT_MODES, PosteriorModel
from policies.router import RouterError, RouterModel
from policies.rules import decode_threshold

SCHEMA = "cascade.policy/v1"
# How `hash` is computed. Artifacts without this field were hashed over everything but the
# hash, `created` included, so refitting the same data gave a new hash every time; they are
# still verified that way. Since content/v2 the hash leaves `created` out: same fit, same hash.
HASH_RULE = "content/v2"
LEGACY_HASH_RULE = "all-but-hash/v1"  # implied when `hash_rule` is absent
_LEFT_OUT = {HASH_RULE: ("hash", "created"), LEGACY_HASH_RULE: ("hash",)}
REQUIRED = (
    "schema",
    "hash",
    "nodes",
    "posterior",
    "tables",
    "recall",
    "lambda",
    "training",
    "expected",
)


class ArtifactError(InvalidInput):
    """A policy artifact is missing, unreadable, or not one this version can use."""


def content_hash(art: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the artifact, by the rule it names in `hash_rule`:
    everything but `hash` and `created` (content/v2), or, for artifacts written before that
    field existed, everything but `hash`."""
    rule = art.get("hash_rule", LEGACY_HASH_RULE)
    if not isinstance(rule, str) or rule not in _LEFT_OUT:
        raise ArtifactError(f"unknown hash_rule {rule!r} (this version knows {HASH_RULE!r})")
    body = {k: v for k, v in art.items() if k not in _LEFT_OUT[rule]}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------- the shape of the JSON


class _Bad(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")


Check = Callable[[Any, str], None]


def _number(v: Any, path: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad(path, f"expected a number, got {_kind(v)}")


def _integer(v: Any, path: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(path, f"expected an integer, got {_kind(v)}")


def _string(v: Any, path: str) -> None:
    if not isinstance(v, str):
        raise _Bad(path, f"expected a string, got {_kind(v)}")


def _boolean(v: Any, path: str) -> None:
    if not isinstance(v, bool):
        raise _Bad(path, f"expected true or false, got {_kind(v)}")


def _threshold(v: Any, path: str) -> None:
    if v not in ("always", "never"):
        _number(v, path)


def _label(v: Any, path: str) -> None:
    if v not in ("correct", "quality"):
        raise _Bad(path, f"expected 'correct' or 'quality', got {v!r}")


def _agreement_mode(v: Any, path: str) -> None:
    if v not in AGREEMENT_MODES:
        raise _Bad(path, f"expected one of {list(AGREEMENT_MODES)}, got {v!r}")


def _nullable(check: Check) -> Check:
    def run(v: Any, path: str) -> None:
        if v is not None:
            check(v, path)

    return run


def _list_of(check: Check) -> Check:
    def run(v: Any, path: str) -> None:
        if not isinstance(v, list):
            raise _Bad(path, f"expected a list, got {_kind(v)}")
        for i, item in enumerate(v):
            check(item, f"{path}[{i}]")

    return run


def _object(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    def run(v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(path, f"expected an object, got {_kind(v)}")
        for key, check in required.items():
            if key not in v:
                raise _Bad(_join(path, key), "missing")
            check(v[key], _join(path, key))
        for key, check in (optional or {}).items():
            if key in v:
                check(v[key], _join(path, key))

    return run


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


_NUMBERS = _list_of(_number)
_NODE = _object({"model": _string, "cost_usd": _number}, {"cost_fraction": _number})
_POSTERIOR = _object(
    {"weights": _NUMBERS, "bias": _number, "conf_mean": _NUMBERS, "conf_scale": _NUMBERS}
)
_TABLES = _object(
    {
        "edges": _list_of(_NUMBERS),
        "values": _list_of(_NUMBERS),
        "decision": _list_of(_list_of(_integer)),
        "sigma": _list_of(_NUMBERS),
    }
)
_CALIBRATOR = _object(
    {"weights": _NUMBERS, "bias": _number, "mean": _NUMBERS, "scale": _NUMBERS},
    {"uses_confidence": _boolean, "kind": _string, "features": _list_of(_string)},
)
_DIFFICULTY = _object(
    {"indices": _list_of(_integer), "weights": _NUMBERS, "bias": _number, "edges": _NUMBERS},
    {"dim": _integer},
)
_SWEEP = _object(
    {"lambda": _number, "decision": _list_of(_list_of(_integer))}, {"cost_price_mu": _number}
)


def _router(v: Any, path: str) -> None:
    try:
        RouterModel.from_dict(v, path)
    except RouterError as exc:  # its message starts with the field's own path
        where, _, message = str(exc).partition(": ")
        raise _Bad(where, message) from None


_ROOT_CHOICE = _object(
    {}, {"kind": _string, "requested": _string, "held_out_area": _object({}, {})}
)
_THRESHOLD = _object(
    {"lambda": _number, "chain": _list_of(_string), "thresholds": _list_of(_threshold)}
)
_AGREEMENT = _object({"lambda": _number, "tiers": _list_of(_list_of(_string)), "theta": _number})
_OPTIONAL_FIELDS = _list_of(_string)
_ARTIFACT = _object(
    {
        "schema": _string,
        "hash": _string,
        "nodes": _list_of(_NODE),
        "posterior": _POSTERIOR,
        "tables": _TABLES,
        "recall": _boolean,
        "lambda": _number,
        "training": _object(
            {},
            {
                "path": _nullable(_string),
                "rows": _integer,
                "models": _list_of(_string),
                "cost_source": _nullable(_string),
                "reference_accuracy": _nullable(_number),
                "bins": _list_of(_integer),
                "shrinkage_kappa": _nullable(_number),
                "warnings": _list_of(_string),
                "root_choice": _nullable(_ROOT_CHOICE),
            },
        ),
        "expected": _object(
            {},
            {
                "accuracy": _number,
                "mean_cost_usd": _number,
                "cost_fraction": _number,
                "calls_per_query": _number,
                "accuracy_95": _NUMBERS,
                "mean_cost_usd_95": _NUMBERS,
            },
        ),
    },
    {
        "hash_rule": _string,
        "created": _nullable(_string),
        "reference_model": _nullable(_string),
        "reference_cost_usd": _nullable(_number),
        "answer_kind": _nullable(_string),
        "label": _label,
        "recall_margin": _number,
        "agreement": _agreement_mode,
        "cost_price_mu": _nullable(_number),
        "length_calibration": _nullable(_list_of(_nullable(_CALIBRATOR))),
        "difficulty": _nullable(_DIFFICULTY),
        "router": _nullable(_router),
        "transitions": _nullable(_string),
        "sweep": _nullable(_list_of(_SWEEP)),
        "baselines": _nullable(
            _object({}, {"threshold": _list_of(_THRESHOLD), "agreement": _list_of(_AGREEMENT)})
        ),
    },
)


def _check_sizes(art: dict) -> None:
    """What the shapes alone do not say: per-node lists have one entry per node (the
    decision tables one more, for the start)."""
    n = len(art["nodes"])
    if n == 0:
        raise _Bad("nodes", "expected at least one node")
    per_node = [
        ("tables.edges", art["tables"]["edges"]),
        ("tables.values", art["tables"]["values"]),
    ]
    per_node += [(f"posterior.{k}", art["posterior"][k]) for k in ("conf_mean", "conf_scale")]
    if art.get("length_calibration"):
        per_node.append(("length_calibration", art["length_calibration"]))
    for path, items in per_node:
        if len(items) != n:
            raise _Bad(path, f"expected {n} entries (one per node), got {len(items)}")
    tables = [
        ("tables.decision", art["tables"]["decision"]),
        ("tables.sigma", art["tables"]["sigma"]),
    ]
    tables += [
        (f"sweep[{i}].decision", e["decision"]) for i, e in enumerate(art.get("sweep") or [])
    ]
    for path, items in tables:
        if len(items) != n + 1:
            raise _Bad(
                path, f"expected {n + 1} entries (the start and each node), got {len(items)}"
            )
    for path, items in tables[:1] + tables[2:]:  # decisions: stop (-1) or a node
        for i, row in enumerate(items):
            for j, move in enumerate(row):
                if not -1 <= move < n:
                    raise _Bad(f"{path}[{i}][{j}]", f"expected -1 (stop) to {n - 1}, got {move}")
    baselines = art.get("baselines") or {}
    for i, s in enumerate(baselines.get("threshold") or []):
        if not s["chain"]:
            raise _Bad(f"baselines.threshold[{i}].chain", "expected at least one model")
        if len(s["thresholds"]) != len(s["chain"]) - 1:
            raise _Bad(
                f"baselines.threshold[{i}].thresholds", "expected one per chain model but the last"
            )
    for i, s in enumerate(baselines.get("agreement") or []):
        if not s["tiers"] or not all(s["tiers"]):
            raise _Bad(f"baselines.agreement[{i}].tiers", "expected non-empty tiers")
    difficulty = art.get("difficulty")
    if difficulty and difficulty.get("dim", DIM) != DIM:
        raise _Bad("difficulty.dim", f"expected {DIM}, got {difficulty['dim']}")
    router = art.get("router")
    if router is not None:
        if difficulty:
            raise _Bad("router", "an artifact has one prompt root: router or difficulty, not both")
        if len(router["models"]) != n:
            raise _Bad("router.models", f"expected {n} entries (one per node)")
        for path, decision in tables[:1] + tables[2:]:  # the pick is the first call
            if list(decision[0]) != list(range(n)):
                raise _Bad(
                    f"{path}[0]", f"expected {list(range(n))} (a router root calls its pick)"
                )


# ---------------------------------------------------------------- the typed artifact


@dataclass(frozen=True)
class Node:
    model: str  # a model, or a tier `tier:a+b`
    cost_usd: float  # its mean cost per query on train
    cost_fraction: float | None  # of the reference model's


@dataclass(frozen=True)
class SweepEntry:
    """The decision tables at one lambda of the fit's grid (bins and values are shared)."""

    lam: float
    decision: list[list[int]]
    mu: float | None = None  # its cost price, where a router root needs it exactly


@dataclass(frozen=True)
class ThresholdSetting:
    lam: float
    chain: list[str]
    thresholds: list[float]  # -inf: always stop; +inf: never


@dataclass(frozen=True)
class AgreementSetting:
    lam: float
    tiers: list[list[str]]
    theta: float


@dataclass(frozen=True)
class Training:
    path: str | None
    rows: int | None
    models: list[str]
    reference_accuracy: float | None
    bins: list[int]


@dataclass(frozen=True)
class Expected:
    """The fit's estimate on train (out-of-fold replay)."""

    accuracy: float | None
    mean_cost_usd: float | None
    cost_fraction: float | None
    calls_per_query: float | None
    accuracy_95: list[float] | None  # 95% bootstrap interval over train rows


@dataclass(frozen=True)
class PolicyArtifact:
    """A checked policy artifact. `data` is the JSON object as written (its content hash is
    computed over it); every other field is read from it once, typed."""

    data: dict
    hash: str
    nodes: list[Node]
    reference_model: str | None
    reference_cost_usd: float | None
    answer_kind: str | None
    label: str  # what p means: P(correct), or E[quality] (`fit --label quality`)
    recall: bool
    recall_margin: float
    agreement_mode: str  # how the posterior reads agreement: "exact" classes or "graded"
    lam: float
    transitions: str | None
    posterior: PosteriorModel
    tables: StateTables
    difficulty: DifficultyModel | None
    router: RouterModel | None  # the other root kind (at the artifact's price); None: not used
    length_calibrators: list[NodeCalibrator | None]  # length or free-text, per node
    sweep: list[SweepEntry]
    threshold: list[ThresholdSetting]
    agreement: list[AgreementSetting]
    training: Training
    expected: Expected

    @property
    def models(self) -> list[str]:
        """The node names, cheapest first."""
        return [n.model for n in self.nodes]

    def nearest_lambda(self, lam: float) -> float:
        """The lambda of the sweep closest to `lam` (the artifact's own if no sweep)."""
        grid = [e.lam for e in self.sweep] or [self.lam]
        return min(grid, key=lambda x: (abs(x - lam), -x))

    def policy(self, lam: float | None = None) -> CascadePolicy:
        """The online index policy; with `lam`, the decisions the sweep holds for the
        nearest lambda (bins, values and the answer posterior do not depend on lambda)."""
        tables = self.tables
        router = self.router
        if lam is not None and self.sweep:
            chosen = self.nearest_lambda(lam)
            entry = next(e for e in self.sweep if e.lam == chosen)
            decision = [np.asarray(d, dtype=int) for d in entry.decision]
            tables = StateTables(tables.edges, tables.values, decision, tables.sigma)
            if router is not None:  # the router picks at that lambda's price
                router = router.at_price(entry.mu if entry.mu is not None else 1 / chosen - 1)
        return CascadePolicy(
            self.posterior,
            tables,
            self.recall,
            self.recall_margin,
            self.difficulty,
            self.length_calibrators,
            graded=self.agreement_mode == "graded",
            router=router,
        )

    def baseline(
        self, kind: str, lam: float | None = None
    ) -> ThresholdSetting | AgreementSetting | None:
        """The `kind` ("threshold" or "agreement") setting for the lambda nearest `lam`
        (default: the artifact's own); None when the artifact has none."""
        settings: list = self.threshold if kind == "threshold" else self.agreement
        if not settings:
            return None
        target = self.lam if lam is None else lam
        return min(settings, key=lambda e: (abs(e.lam - target), -e.lam))

    def threshold_setting(self, lam: float | None = None) -> ThresholdSetting:
        """The threshold baseline's setting nearest `lam` (ArtifactError if none)."""
        setting = self.baseline("threshold", lam)
        if not isinstance(setting, ThresholdSetting):
            raise ArtifactError(f"policy artifact {self.hash[:19]} holds no threshold setting")
        return setting

    def agreement_setting(self, lam: float | None = None) -> AgreementSetting:
        """The agreement baseline's setting nearest `lam` (ArtifactError if none)."""
        setting = self.baseline("agreement", lam)
        if not isinstance(setting, AgreementSetting):
            raise ArtifactError(f"policy artifact {self.hash[:19]} holds no agreement setting")
        return setting

    def decision_tables(self) -> list[list[list[int]]]:
        """Every decision table the artifact can use: its own and the sweep's."""
        return [[d.tolist() for d in self.tables.decision], *(e.decision for e in self.sweep)]

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1) + "\n"

    @classmethod
    def from_dict(cls, art: dict, source: str = "(in memory)") -> PolicyArtifact:
        """Check `art` (schema, fields, hash, then every field's shape) and type it."""
        where = f"policy artifact {source}"
        if art.get("schema") != SCHEMA:
            raise ArtifactError(f"{where}: schema {art.get('schema')!r}, expected {SCHEMA!r}")
        missing = [k for k in REQUIRED if k not in art]
        if missing:
            raise ArtifactError(f"{where}: missing field(s) {missing}")
        try:
            expected = content_hash(art)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from None
        if expected != art["hash"]:
            raise ArtifactError(f"{where}: content does not match its hash (edited?)")
        try:
            _ARTIFACT(art, "")
            _check_sizes(art)
        except _Bad as exc:
            raise ArtifactError(f"{where}: {exc}") from None
        return cls._typed(art)

    @classmethod
    def _typed(cls, art: dict) -> PolicyArtifact:
        nodes = [
            Node(n["model"], float(n["cost_usd"]), n.get("cost_fraction")) for n in art["nodes"]
        ]
        baselines = art.get("baselines") or {}
        training = art["training"]
        expected = art["expected"]
        ref_cost = art.get("reference_cost_usd")
        return cls(
            data=art,
            hash=art["hash"],
            nodes=nodes,
            reference_model=art.get("reference_model"),
            reference_cost_usd=None if ref_cost is None else float(ref_cost),
            answer_kind=art.get("answer_kind"),
            label=str(art.get("label", "correct")),  # artifacts written before labels: correct
            recall=art["recall"],
            recall_margin=float(art.get("recall_margin", 0.0)),
            agreement_mode=str(art.get("agreement", "exact")),  # absent: exact classes
            lam=float(art["lambda"]),
            transitions=art.get("transitions"),
            posterior=PosteriorModel.from_dict(art["posterior"]),
            tables=StateTables.from_dict(art["tables"]),
            difficulty=DifficultyModel.from_dict(art["difficulty"])
            if art.get("difficulty")
            else None,
            router=RouterModel.from_dict(art["router"]) if art.get("router") else None,
            length_calibrators=[
                calibrator_from(d) for d in (art.get("length_calibration") or [None] * len(nodes))
            ],
            sweep=[
                SweepEntry(
                    float(e["lambda"]),
                    e["decision"],
                    None if e.get("cost_price_mu") is None else float(e["cost_price_mu"]),
                )
                for e in art.get("sweep") or []
            ],
            threshold=[
                ThresholdSetting(
                    float(e["lambda"]),
                    list(e["chain"]),
                    [decode_threshold(t) for t in e["thresholds"]],
                )
                for e in baselines.get("threshold") or []
            ],
            agreement=[
                AgreementSetting(
                    float(e["lambda"]), [list(t) for t in e["tiers"]], float(e["theta"])
                )
                for e in baselines.get("agreement") or []
            ],
            training=Training(
                path=training.get("path"),
                rows=training.get("rows"),
                models=list(training.get("models") or []),
                reference_accuracy=training.get("reference_accuracy"),
                bins=list(training.get("bins") or []),
            ),
            expected=Expected(
                accuracy=expected.get("accuracy"),
                mean_cost_usd=expected.get("mean_cost_usd"),
                cost_fraction=expected.get("cost_fraction"),
                calls_per_query=expected.get("calls_per_query"),
                accuracy_95=expected.get("accuracy_95"),
            ),
        )


def parse_artifact(text: str, source: str) -> PolicyArtifact:
    """The one loader: the artifact in `text` (read from `source`), checked and typed."""
    try:
        art = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"policy artifact {source} is not valid JSON: {exc}") from None
    if not isinstance(art, dict):
        raise ArtifactError(f"policy artifact {source}: expected a JSON object")
    return PolicyArtifact.from_dict(art, source)
