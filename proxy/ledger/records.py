"""Plain records the proxy hands to the ledger writer, and their JSON-lines spool form.

A :class:`RequestRecord` is one request through the proxy; its ``calls`` are the upstream
calls (attempts) made for it, in order. Records are plain dataclasses so building one on the
request path costs nothing, and they round-trip through ``to_dict``/``from_dict`` so the
writer can spool them to a local file while the database is unreachable.

API keys are never stored: a record built with a key keeps the key's name from the config
(`key_label`), or else only :func:`key_id` of it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import MISSING, InitVar, dataclass, field, fields
from typing import Any

KEY_ID_HEX = 16  # hex characters of sha256 kept for an API key (64 bits)


def key_id(api_key: str | None) -> str | None:
    """A short, stable, non-reversible identifier of an API key (sha256 hex prefix)."""
    if api_key is None or api_key == "":
        return None
    return _key_hash(api_key)


@functools.lru_cache(maxsize=1024)  # a client sends its key with every request
def _key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:KEY_ID_HEX]


@dataclass
class CallRecord:
    """One upstream call made while serving a request.

    ``status`` is ``"ok"`` or an error kind (``"timeout"``, ``"http_error"``, ...);
    ``cost_usd`` is ``None`` when the price is unknown (never 0 for "unknown");
    ``decision`` is what the policy did after reading this call (``"stop"``,
    ``"continue:<model>"``, ...).
    """

    order: int
    model: str
    backend: str | None
    status: str
    http_status: int | None
    tokens_in: int | None
    tokens_out: int | None
    cost_usd: float | None
    latency_ms: float | None
    ttft_ms: float | None
    confidence: float | None
    p_correct: float | None
    agreement: bool | None
    decision: str | None
    error: str | None
    node: int | None = None
    samples: int | None = None  # a sampled node's k (model@k); None for any other call
    vote_share: float | None = None  # a sampled node's vote share
    # the answer's token-logprob summary (mean, min, q05, q25); None when none was read.
    # Defaults, so spool lines written before these fields existed still replay.
    lp_mean: float | None = None
    lp_min: float | None = None
    lp_q05: float | None = None
    lp_q25: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallRecord:
        return cls(**_known(cls, data))


@dataclass
class RequestRecord:
    """One request through the proxy.

    ``ts`` is the request's arrival time in epoch seconds. ``api_key`` may be given as the
    raw key: construction replaces it with ``key_label`` (the key's configured name) if
    given, else with :func:`key_id` of it, so the key itself never reaches the queue, the
    spool or the database. ``cost_usd`` and ``reference_cost_usd``
    are ``None`` when unknown; ``reference_cost_usd`` is what always calling the cascade's
    reference model would have cost.
    """

    request_id: str
    ts: float
    api_key: str | None
    cascade: str | None
    model_requested: str
    policy_hash: str | None
    status: int
    chosen_model: str | None
    n_calls: int
    tokens_in: int
    tokens_out: int
    cost_usd: float | None
    reference_cost_usd: float | None
    latency_ms: float
    overhead_ms: float
    error: str | None
    stream: bool = False
    calls: list[CallRecord] = field(default_factory=list)
    key_label: InitVar[str | None] = None

    def __post_init__(self, key_label: str | None) -> None:
        self.api_key = key_label if key_label and self.api_key else key_id(self.api_key)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "calls"}
        out["calls"] = [c.to_dict() for c in self.calls]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        """Rebuild a record from :meth:`to_dict` output; ``api_key`` is already hashed."""
        known = _known(cls, data)
        hashed = known.pop("api_key", None)
        known["calls"] = [CallRecord.from_dict(c) for c in known.get("calls") or []]
        record = cls(api_key=None, **known)
        record.api_key = hashed  # already a key id: do not hash it again
        return record


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` present in ``data``; unknown keys are ignored (newer spools)."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in data:
            out[f.name] = data[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{cls.__name__} record is missing {f.name!r}")
    return out
