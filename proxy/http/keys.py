"""Keys from the ledger database on the request path: who the bearer is, whether the key may
call this cascade, its rate limit and its budget. The request path never waits on the
database: `KeyCache` holds every key and its spend so far, refreshed by a thread every
`server.keys_refresh_s` seconds.

Budget: the key's known spend in its calendar period (UTC) from the ledger's daily rollups,
plus what this process submitted that the database does not hold yet (queued, or spooled
during an outage), plus the worst cases of this process's requests in flight, plus this
request's worst case, must stay within the budget. Several processes on one database each
see the others' spend once it is written and refreshed, so a budget can be passed by at most
the worst cases of the other processes' requests in flight plus the spend of those started
within one refresh (read the README's keys section).

Rate limit (`rpm`): a fixed one-minute window per key, counted in memory by one process,
and in a file under the folder `serve --workers N` shares between its workers (with an
exclusive lock), so the limit holds per key across the workers of one instance; each
instance counts on its own.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.http.errors import ApiError
from proxy.ledger.keys import StoredKey, hash_secret, period_end, period_start

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from proxy.engine.cascade import CappedPlan, LoadedPolicy
    from proxy.ledger.records import RequestRecord

log = logging.getLogger("cascade.keys")

DEFAULT_OUTPUT_LIMIT = 4096  # output tokens assumed for a model whose limit is not known


@dataclass
class KeyCache:
    """Every key of `api_keys` by the hash of its secret, and each key's spend so far."""

    engine_factory: object  # () -> Engine, made on the refresh thread's first run
    refresh_s: float = 2.0
    reserved_names: frozenset[str] = frozenset()  # the config's key names: DB keys may not
    by_hash: dict[str, StoredKey] = field(default_factory=dict)
    spend: dict[tuple[str, dt.date], float] = field(default_factory=dict)  # from the database
    loaded: bool = False
    budgeted: frozenset[str] = frozenset()  # names of keys with a budget: their spend is tracked
    _unwritten: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    _inflight: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _tried: threading.Event = field(default_factory=threading.Event)  # a first read ended
    _thread: threading.Thread | None = None
    _engine: Engine | None = None
    last_error: str | None = None

    # -------------------------------------------------------------- background refresh

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cascade-keys", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._engine is not None:
            self._engine.dispose()

    def status(self) -> dict:
        """The keys' part of /health: how many were read, and why the last read failed."""
        return {"loaded": self.loaded, "keys": len(self.by_hash), "error": self.last_error}

    def wait_tried(self, seconds: float) -> bool:
        """Wait up to `seconds` for the first read to end (well or not)."""
        return self._tried.wait(seconds)

    def _run(self) -> None:
        self.refresh()
        self._tried.set()
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        """Read the keys and their spend. Which unwritten records reached the database is
        asked before the spend is read, so a record written in between is counted twice
        (for one refresh), never missed."""
        from proxy.ledger.keys import list_keys, spend_since, written_request_ids

        try:
            if self._engine is None:
                self._engine = self.engine_factory()  # type: ignore[operator]
            engine = self._engine
            now = dt.datetime.now(dt.UTC)
            keys = list_keys(engine)
            with self._lock:
                pending = list(self._unwritten)
            written = written_request_ids(engine, pending) if pending else set()
            budgeted = [k for k in keys if k.budget_usd is not None and k.period]
            first = min((period_start(k.period, now) for k in budgeted), default=now)  # type: ignore[arg-type]
            spend = spend_since(engine, [k.name for k in budgeted], first.date())
        except Exception as exc:  # the database is down: keep the last view, keep counting
            if self.last_error is None:
                log.warning("keys: cannot refresh from the ledger database: %s", exc)
            self.last_error = str(exc)
            return
        by_hash = {}
        for k in keys:
            if k.name in self.reserved_names:
                log.warning(
                    "keys: %r is also a config key name: the database key is ignored", k.name
                )
                continue
            by_hash[k.key_hash] = k
        stale = time.time() - 3600.0  # a reservation left by a bug must not hold forever
        with self._lock:
            for rid in written:
                self._unwritten.pop(rid, None)
            for rid in [r for r, (_, _, t) in self._inflight.items() if t < stale]:
                self._inflight.pop(rid, None)
            self.by_hash, self.spend, self.loaded = by_hash, spend, True
            self.budgeted = frozenset(k.name for k in budgeted)
        self.last_error = None

    # -------------------------------------------------------------- the request path

    def lookup(self, secret: str) -> StoredKey | None:
        return self.by_hash.get(hash_secret(secret)) if self.by_hash else None

    def accepts(self, secret: str) -> bool:
        """True for a usable database key; False for a key it does not know; a 401 naming
        why for a revoked or expired one, a 503 before the keys were first read."""
        key = self.lookup(secret)
        if key is None:
            if not self.loaded:
                raise ApiError(
                    503,
                    "API keys are not loaded yet (the ledger database has not answered)",
                    code="keys_unavailable",
                )
            return False
        if key.revoked_at is not None:
            raise ApiError(401, f"The API key {key.name!r} was revoked", code="revoked_api_key")
        if key.expires_at is not None and key.expires_at <= dt.datetime.now(dt.UTC):
            raise ApiError(
                401,
                f"The API key {key.name!r} expired at {key.expires_at:%Y-%m-%dT%H:%M:%SZ}",
                code="expired_api_key",
            )
        return True

    def note(self, record: RequestRecord) -> None:
        """A record went to the ledger writer: its spend counts until the database has it,
        and its request's reservation ends."""
        with self._lock:
            self._inflight.pop(record.request_id, None)
            if record.cost_usd and record.api_key in self.budgeted:
                self._unwritten[record.request_id] = (record.api_key, record.cost_usd, record.ts)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._inflight.pop(request_id, None)

    def split(self, request_id: str, part_id: str, usd: float) -> bool:
        """Move `usd` of a request's reservation to a reservation of its own, `part_id`,
        that its record does not end (`note` ends `request_id`'s): for the calls the
        request leaves running after it is recorded (an explored request's judge). The
        total reserved is unchanged, so there is no moment when that spend is neither
        reserved nor recorded. False when the request holds no reservation."""
        if usd <= 0:
            return False
        with self._lock:
            held = self._inflight.get(request_id)
            if held is None:
                return False
            name, worst, since = held
            part = min(usd, worst)
            self._inflight[request_id] = (name, worst - part, since)
            self._inflight[part_id] = (name, part, since)
        return True

    def reserve(self, key: StoredKey, request_id: str, worst: float, now: dt.datetime) -> None:
        """Count `worst` against the key's budget while the request runs, or refuse it (429
        budget_exceeded, with the reset time) when spend plus it would pass the budget."""
        if key.budget_usd is None or not key.period:
            return
        start = period_start(key.period, now)
        since = start.timestamp()
        with self._lock:
            spent = sum(
                c for (n, day), c in self.spend.items() if n == key.name and day >= start.date()
            )
            spent += sum(
                c for n, c, ts in self._unwritten.values() if n == key.name and ts >= since
            )
            spent += sum(c for n, c, _ in self._inflight.values() if n == key.name)
            if spent + worst > key.budget_usd:
                reset = period_end(key.period, now)
                raise ApiError(
                    429,
                    f"Budget exceeded for key {key.name!r}: ${spent:.6f} of ${key.budget_usd:g} "
                    f"spent or reserved this {key.period} (UTC), and this request could cost up "
                    f"to ${worst:.6f}. The budget resets at {reset:%Y-%m-%dT%H:%M:%SZ}.",
                    code="budget_exceeded",
                )
            self._inflight[request_id] = (key.name, worst, time.time())

    def spent(self, key: StoredKey, now: dt.datetime) -> float:
        """The key's spend in its current period, as the budget check sees it."""
        if not key.period:
            return 0.0
        start = period_start(key.period, now)
        with self._lock:
            total = sum(
                c for (n, day), c in self.spend.items() if n == key.name and day >= start.date()
            )
            total += sum(
                c
                for n, c, ts in self._unwritten.values()
                if n == key.name and ts >= start.timestamp()
            )
        return total


# ------------------------------------------------------------------ rate limits


class RateLimiter:
    """A fixed one-minute window per key: in memory, or in files of a folder the workers of
    one instance share (an exclusive lock per count)."""

    def __init__(self, shared_dir: Path | None) -> None:
        self.shared_dir = shared_dir
        self.counts: dict[str, tuple[int, int]] = {}

    def hit(self, name: str, rpm: int, now: float) -> None:
        minute = int(now // 60)
        if self.shared_dir is None:
            window, count = self.counts.get(name, (minute, 0))
            count = count + 1 if window == minute else 1
            self.counts[name] = (minute, count)
        else:
            count = self._shared_hit(name, minute)
        if count > rpm:
            retry = max(1, int(60 - now % 60 + 0.999))
            error = ApiError(
                429,
                f"Rate limit reached for key {name!r}: {rpm} requests per minute. "
                f"Try again in {retry} s.",
                code="rate_limited",
            )
            error.headers = {"Retry-After": str(retry)}  # type: ignore[attr-defined]
            raise error

    def _shared_hit(self, name: str, minute: int) -> int:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        fd = os.open(self.shared_dir / f"rpm-{digest}", os.O_RDWR | os.O_CREAT, 0o600)  # type: ignore[operator]
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 16, 0)
            window, count = struct.unpack("<qq", raw) if len(raw) == 16 else (minute, 0)
            count = count + 1 if window == minute else 1
            os.pwrite(fd, struct.pack("<qq", minute, count), 0)
            return count
        finally:
            os.close(fd)  # releases the lock


# ------------------------------------------------------------------ admission


@dataclass
class WorstCase:
    """The most a request can cost: `usd`, and the models whose price is not known (they
    count 0) or whose output limit was assumed. `judge_usd` is the part of `usd` an
    explored request's LLM judge may spend after the request is recorded (`hold_judge`)."""

    usd: float
    unpriced: list[str]
    judge_usd: float = 0.0

    def plus(self, other: WorstCase) -> WorstCase:
        """Both worst cases: a request's calls and its judge's, say."""
        unpriced = list(dict.fromkeys(self.unpriced + other.unpriced))
        return WorstCase(self.usd + other.usd, unpriced, self.judge_usd + other.judge_usd)


def worst_case(state, chat, messages: list[dict], loaded: LoadedPolicy | None = None) -> WorstCase:
    """The most the request can cost, reserved against a key's budget before any call. A
    budget must hold whatever the policy decides, so this counts the longest walk, not the
    likely one; `loaded` is the policy snapshot the request will run with (chat.py passes
    the same one to the engine: a reload in between cannot change the plan that runs).

    The calls: a model asked by name is one call (with the request's `n`); a cascade's are
    its engine's `most_calls` (each node of the plan once, a sampled node's k samples, and,
    since any request may be explored when `explore_rate` > 0, every explored call and
    further sample too; see CascadeEngine.most_calls). Each call counts the prompt's bytes
    as input tokens (a token is at least a byte) and, per choice, `max_tokens` (else the
    model's output limit, else 4096) as output tokens. An explored request of a cascade
    graded by `judge:MODEL` also has the judge read each explored model's answer: counted
    as the prompt, the judge's template and that answer's output-token bound (the judge is
    assumed to need no more tokens for an answer than the model that wrote it), and the
    judge's own `max_tokens`; that part stays reserved until the judge's calls are
    recorded, after the request's own record (`hold_judge`). A request with
    `cascade.max_cost_usd` is bounded tighter by its cap (`capped_worst_case`), but not by
    the cap alone: the walk's cap is soft.

    Retries (`max_retries`, on 429, 5xx, refused connections and streams that break before
    their first token) are not counted: one attempt per call. An attempt that failed before
    any token costs nothing in the ledger (Pricer.failed_cost: 0 for a token-priced model).
    One that failed after some tokens (a stream cut, timed out or ended by an error
    mid-answer) is ledgered with them and their cost (upstreams.common.charge_partial), but
    is never retried: the backends retry a stream only before its first token (litellm's
    retries open a stream, they never resume one), and the cascade's walk calls its models
    without streaming (a failed call has no tokens; the node it falls back to is counted
    already). So a call records one costed attempt at most, within its prompt and
    `max_tokens`. Not retrying once tokens arrived (what OpenAI's SDKs do with a broken
    stream) is chosen over counting every costed attempt, which would reserve
    1 + max_retries answers for every request although nearly none is retried. (A model
    priced by `gpu_hourly_usd` costs its busy time, retries included; it has no token
    price, so it counts 0 here and is named unpriced.)"""
    engine = state.engines.get(chat.model)
    size = sum(len(str(m.get("content") or "").encode()) + 8 for m in messages)
    asked = chat.max_tokens or chat.max_completion_tokens
    if engine is None:
        return price_calls([(chat.model, chat.n or 1)], size, asked, state.worst_price)
    loaded = engine.snapshot(loaded)
    overrides = chat.overrides
    if overrides.max_cost_usd is not None:
        plan = engine.capped_plan(overrides.policy, overrides.lam, loaded)
        if plan is None:  # no such baseline: refused before any call
            return WorstCase(0.0, [])
        return capped_worst_case(plan, overrides.max_cost_usd, size, asked, state.worst_price)
    cascade = state.config.cascades[chat.model]
    explore = cascade.explore_rate > 0
    calls = engine.most_calls(overrides.policy, overrides.lam, explore, loaded)
    worst = price_calls(calls, size, asked, state.worst_price)
    explored = explore and loaded.policy is not None and overrides.policy == "index"
    if explored and cascade.explore_grader.startswith("judge:"):
        judge = cascade.explore_grader.removeprefix("judge:")
        judged = engine.explore_models(loaded)
        worst = worst.plus(judge_calls(judge, judged, size, asked, state.worst_price))
    return worst


def capped_worst_case(
    plan: CappedPlan, cap: float, size: int, asked: int | None, price: Price
) -> WorstCase:
    """The most a request under `cascade.max_cost_usd` = `cap` can cost. The walk's cap is
    soft (policies/walk.py): it makes a step's calls S when the spend so far plus their
    expected cost E(S) is within the cap, so the spend before the last step L is at most
    cap - E(L), and L itself costs at most its worst case W(L) (its calls priced as
    `price_calls` does); the total is then at most cap + W(L) - E(L), and never more than
    W of every node that can be called at all. A step can be called only if E(S) <= cap
    (the spend so far is never negative), so the bound is

        min(sum of W(k) over the nodes of callable steps,
            cap + max over callable steps L of (W(L) - E(L)))

    and 0 when no step is callable (the request is refused with no call). A capped request
    is never explored, so no explored or judge call counts."""
    node = [price_calls(calls, size, asked, price) for calls in plan.calls]
    steps = [s for s in plan.steps if sum(plan.expected[k] for k in s) <= cap]
    if not steps:
        return WorstCase(0.0, [])
    reachable = sorted({k for s in steps for k in s})
    full = sum(node[k].usd for k in reachable)
    excess = max(sum(node[k].usd - plan.expected[k] for k in s) for s in steps)
    unpriced = [m for k in reachable for m in node[k].unpriced]
    return WorstCase(min(full, cap + excess), list(dict.fromkeys(unpriced)))


Price = Callable[[str], tuple[tuple[float, float] | None, int | None]]


def output_tokens(asked: int | None, limit: int | None) -> int:
    """The output tokens one choice may take: `max_tokens`, else the model's limit."""
    return asked or limit or DEFAULT_OUTPUT_LIMIT


def price_calls(
    calls: list[tuple[str, int]], size: int, asked: int | None, price: Price
) -> WorstCase:
    """(model, choices) calls priced at `size` input tokens each and `output_tokens` per
    choice; `price(model)` gives USD per token in and out (None: unknown, counted 0 and
    named in `unpriced`) and the model's output limit."""
    usd, unpriced = 0.0, []
    for model, choices in calls:
        if choices < 1:
            raise ValueError(f"a call of {model!r} asks for {choices} choices")
        per_token, limit = price(model)
        if per_token is None:
            unpriced.append(model)
            continue
        usd += size * per_token[0] + choices * output_tokens(asked, limit) * per_token[1]
    return WorstCase(usd, list(dict.fromkeys(unpriced)))


def judge_calls(
    judge: str, judged: list[str], size: int, asked: int | None, price: Price
) -> WorstCase:
    """An LLM judge's calls on an explored request: one per model in `judged`, reading the
    prompt (`size`), its template and that model's answer at its output-token bound, and
    answering in at most JUDGE_PARAMS' `max_tokens`."""
    from policies.judging import JUDGE_PARAMS, judge_messages

    template = sum(len(m["content"].encode()) + 8 for m in judge_messages("", "", None))
    per_token, judge_limit = price(judge)
    if per_token is None:
        return WorstCase(0.0, [judge])
    verdict = min(int(JUDGE_PARAMS["max_tokens"]), output_tokens(None, judge_limit))
    usd = 0.0
    for model in judged:
        answer = output_tokens(asked, price(model)[1])
        usd += (size + template + answer) * per_token[0] + verdict * per_token[1]
    return WorstCase(usd, [], judge_usd=usd)  # all of it spent after the record


def _nothing() -> None:
    """No reservation was held: nothing to release."""


def hold_judge(state, request_id: str, worst: WorstCase | None) -> Callable[[], None]:
    """Keep the judge's part of an explored request's reservation past the request's record
    (which ends the rest of it), and return what releases it: the Explorer calls it once
    the judge's calls are recorded, or the judge failed or was cancelled, or no judge ran.
    An explored request's judge runs after its response, so without this its spend would
    be, for that while, neither reserved nor recorded, and a concurrent request of the same
    key could be admitted past the budget. Releasing twice is harmless."""
    cache: KeyCache | None = state.keys
    if cache is None or worst is None or worst.judge_usd <= 0:
        return _nothing
    part = f"{request_id}-judge"
    if not cache.split(request_id, part, worst.judge_usd):
        return _nothing
    return functools.partial(cache.release, part)


def admit(
    request,
    state,
    chat,
    messages: list[dict],
    request_id: str,
    secret: str | None,
    loaded: LoadedPolicy | None = None,
) -> WorstCase | None:
    """A database key's limits, checked before anything is spent: the cascades it may call
    (403), its rate (429 rate_limited, Retry-After) and its budget (429 budget_exceeded),
    whose worst case prices the policy snapshot `loaded` the request will run with.
    Returns the worst case when a budget was checked (None otherwise)."""
    cache: KeyCache | None = state.keys
    if cache is None or not secret:
        return None
    key = cache.lookup(secret)
    if key is None:
        return None
    if key.cascades is not None and chat.model not in key.cascades:
        raise ApiError(
            403,
            f"The key {key.name!r} may not call {chat.model!r} (it may call: "
            f"{', '.join(key.cascades)})",
            param="model",
            code="model_not_allowed",
        )
    now = time.time()
    if key.rpm is not None:
        state.rate_limiter.hit(key.name, key.rpm, now)
    if key.budget_usd is None:
        return None
    worst = worst_case(state, chat, messages, loaded)
    cache.reserve(key, request_id, worst.usd, dt.datetime.fromtimestamp(now, dt.UTC))
    return worst
