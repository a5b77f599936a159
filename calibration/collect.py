"""Collect full-information traces from live backends: every dataset item to every model.

Users have prompts and models but no traces; a policy cannot be fitted without them. This
sends each item of a dataset to every model of a cascade (the backends the proxy uses, so
prices, token counts and logprob confidences are the ones it will see when serving), grades
each answer, and appends one DESIGN.md trace row per item.

Dataset JSONL, one item per line: {"id": "q1", "messages": [...], "reference": "B",
"task": "mmlu"} (`task` optional; `reference` may be null only with a judge grader).

Guarantees:
- resumable: ids already in the output are skipped; a torn last line (a killed run) is cut
  off and that item collected again; rows are appended whole, one write per line;
- budget: with `max_cost_usd`, no item starts once the spend of this run plus the items in
  flight, each at the highest cost of an item seen so far, would pass the cap; items in flight
  finish and are written (never a half row); the first item runs alone to learn that cost;
- an upstream failure is a row entry with `answer: null, correct: false, error: KIND` (cost 0:
  nothing was generated), never fatal; a judge that fails to grade leaves the item unwritten
  (a wrong label would poison calibration), so a later run retries it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from calibration.graders import Grade, Grader, default_grader, parse_grader
from policies.answers import detect_kind
from policies.errors import InvalidInput
from policies.freetext import summary_as_dict, token_logprobs_summary
from policies.sampling import check_k, parse_sampled
from policies.signals import answer_confidence
from policies.tiers import tier_members
from policies.traceformat import messages_problems, parse_jsonl

if TYPE_CHECKING:
    from upstreams.base import Backend, CallResult


class Config(Protocol):
    """What collect reads of a proxy.config.Config (calibration does not import the proxy)."""

    models: Mapping[str, Any]
    cascades: Mapping[str, Any]


class CollectError(InvalidInput):
    """Bad input to collect (dataset, output file, cascade); the message names file:line."""


@dataclass(frozen=True)
class Item:
    id: str
    messages: list[dict]
    reference: str | None
    task: str | None
    line: int


def _item_problems(row: object, needs_reference: bool) -> list[str]:
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    errors = []
    rid = row.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
        errors.append("missing field 'id' (a non-empty string or an integer)")
    errors.extend(messages_problems(row.get("messages")))
    ref = row.get("reference")
    if isinstance(ref, bool) or (ref is not None and not isinstance(ref, str | int | float)):
        errors.append("field 'reference' must be a string, a number or null")
    elif ref is None and needs_reference:
        errors.append("field 'reference' is missing or null (only a judge grader needs none)")
    if row.get("task") is not None and not isinstance(row["task"], str):
        errors.append("field 'task' must be a string")
    return errors


def load_dataset(path: str | Path, needs_reference: bool = True) -> list[Item]:
    """Read and validate a dataset JSONL; raises CollectError listing every bad line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CollectError(f"{path}: no such dataset file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CollectError(f"{path}: cannot read: {exc}") from None
    items = []
    for lineno, row in parse_jsonl(
        text, str(path), lambda r: _item_problems(r, needs_reference), CollectError, "items"
    ):
        ref = row.get("reference")
        items.append(
            Item(
                str(row["id"]),
                row["messages"],
                None if ref is None else str(ref),
                row.get("task"),
                lineno,
            )
        )
    return items


def _price_key(cfg: Any) -> float | None:
    if cfg.price_in_per_mtok is None or cfg.price_out_per_mtok is None:
        return None
    return cfg.price_in_per_mtok + cfg.price_out_per_mtok


def cascade_models(config: Config, cascade: str) -> tuple[list[str], str | None]:
    """The cascade's nodes plus its reference model, cheapest first by configured prices
    (input + output price per token); the order given, and a note, when some have none."""
    if cascade not in config.cascades:
        have = ", ".join(sorted(config.cascades)) or "none"
        raise CollectError(f"no cascade {cascade!r} in the configuration (cascades: {have})")
    c = config.cascades[cascade]
    behind = [tier_members(n) or [s[0] if (s := parse_sampled(n)) else n] for n in c.nodes]
    names = list(dict.fromkeys([*(m for ms in behind for m in ms), c.reference]))
    keys = {n: _price_key(config.models[n]) for n in names}
    unpriced = [n for n, k in keys.items() if k is None]
    if unpriced:
        note = (
            f"model(s) {unpriced} have no price_in/out_per_mtok in the configuration: models "
            "kept in the cascade's order, which should be cheapest first"
        )
        return names, note
    return sorted(names, key=lambda n: keys[n]), None


@dataclass
class Existing:
    """What an output file already holds."""

    ids: set[str] = field(default_factory=set)
    cost_usd: float = 0.0
    repaired: str | None = None  # what was done to a torn last line


def prepare_output(path: Path, models: list[str]) -> Existing:
    """Read the ids already collected in `path`; cut a torn last line (a killed run).

    A complete last row missing only its newline gets one. Any other bad line, or rows with
    another model set, is an error: the file is the user's and is not rewritten.
    """
    found = Existing()
    if not path.exists():
        return found
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        try:
            whole = json.loads(data[cut:])
            complete = isinstance(whole, dict) and "id" in whole and "models" in whole
        except (ValueError, UnicodeDecodeError):
            complete = False
        with path.open("r+b") as f:
            if complete:
                f.seek(0, 2)
                f.write(b"\n")
                data += b"\n"
                found.repaired = "added the missing newline after the last row"
            else:
                f.truncate(cut)
                found.repaired = f"cut a torn last line ({len(data) - cut} bytes)"
                data = data[:cut]
    want = set(models)
    for lineno, line in enumerate(data.decode("utf-8", "replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rid, entries = row["id"], row["models"]
        except (ValueError, KeyError, TypeError):
            raise CollectError(f"{path}:{lineno}: not a trace row; give another --out") from None
        if set(entries) != want:
            raise CollectError(
                f"{path}:{lineno}: rows have models {sorted(entries)}, the cascade has "
                f"{sorted(want)}; give another --out"
            )
        found.ids.add(str(rid))
        found.cost_usd += sum(
            float(e.get("cost_usd") or 0.0) + float(e.get("grader_cost_usd") or 0.0)
            for e in entries.values()
            if isinstance(e, dict)
        )
    return found


@dataclass
class Status:
    """Progress of a run, passed to the progress callback after every written row."""

    total: int  # items to collect in this run (already collected ones excluded)
    written: int = 0
    cost_usd: float = 0.0  # this run: model calls plus grading
    grader_cost_usd: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def items_per_s(self) -> float:
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Summary:
    out: Path
    models: list[str]
    grader: str
    kind: str
    items: int  # in the dataset
    already: int  # skipped: already in the output
    written: int
    not_started: int  # left out by the budget cap
    ungraded: list[str]  # ids not written because the judge gave no verdict
    failed_calls: dict[str, int]
    unpriced_calls: int
    cost_usd: float
    grader_cost_usd: float
    prior_cost_usd: float
    stopped_by_budget: bool
    elapsed_s: float
    notes: list[str]


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _entry(result: CallResult, grade: Grade | None, kind: str, judged: bool) -> dict[str, Any]:
    """One model's part of a trace row (DESIGN.md fields, then what helps re-grading)."""
    if not result.ok or grade is None:
        entry: dict[str, Any] = {
            "answer": None,
            "correct": False,
            **({"quality": 0.0} if judged else {}),  # no answer: the lowest grade
            "confidence": None,
            "cost_usd": _finite(result.cost_usd) or 0.0,  # nothing was generated
            "latency_ms": round(result.latency_ms, 3),
            "tokens_in": None,
            "tokens_out": None,
            "error": result.error or "no_text",
            "error_detail": result.error_detail,
        }
        return entry
    confidence = result.confidence
    if confidence is None:  # the proxy's own signal code (engine._call)
        confidence = answer_confidence(result.text, result.token_logprobs, kind)
    entry = {
        "answer": grade.answer,
        "correct": grade.correct,
        **({} if grade.quality is None else {"quality": grade.quality}),
        "confidence": _finite(confidence),
        "cost_usd": _finite(result.cost_usd),
        "latency_ms": round(result.latency_ms, 3),
        "tokens_in": result.tokens_in,
        "tokens_out": result.tokens_out,
        "text": result.text,
        "finish_reason": result.finish_reason,
    }
    summary = token_logprobs_summary(result.token_logprobs)  # as the proxy computes it live
    if summary is not None:
        entry["logprob_summary"] = summary_as_dict(summary)
    if judged:
        entry["grader_cost_usd"] = _finite(grade.cost_usd)
    return entry


class _Budget:
    """Admits items while the spend plus the items in flight stays under the cap."""

    def __init__(self, cap: float | None) -> None:
        self.cap = cap
        self.spent = 0.0
        self.in_flight = 0
        self.max_item = 0.0
        self.seen = 0
        self.stopped = False
        self.cond = asyncio.Condition()

    async def admit(self) -> bool:
        if self.cap is None:
            return True
        async with self.cond:
            await self.cond.wait_for(lambda: self.seen > 0 or self.in_flight == 0)
            if self.stopped or self.spent + (self.in_flight + 1) * self.max_item > self.cap:
                self.stopped = True
                return False
            self.in_flight += 1
            return True

    async def done(self, cost: float) -> None:
        self.spent += cost
        if self.cap is None:
            return
        async with self.cond:
            self.in_flight -= 1
            self.seen += 1
            self.max_item = max(self.max_item, cost)
            self.cond.notify_all()


async def collect(
    config: Config,
    cascade: str,
    dataset: str | Path,
    out: str | Path,
    *,
    concurrency: int = 8,
    grader: str | Grader | None = None,
    max_cost_usd: float | None = None,
    params: Mapping[str, Any] | None = None,
    on_start: Callable[[Status, list[str]], None] | None = None,
    on_row: Callable[[Status], None] | None = None,
    backends: Mapping[str, Backend] | None = None,
    samples: int = 1,
) -> Summary:
    """Collect traces of `cascade`'s models on `dataset`, appended to `out`.

    `concurrency` is the number of items in flight (each calls every model at once);
    `params` are OpenAI sampling parameters sent with every call (default: the upstream's).
    `samples` k > 1 records k answers per model: the answer, as without samples, and the
    `samples` of k - 1 more (one further call with `n: k - 1`, or k - 1 parallel calls, as
    the model's `sampling` says), for sampled nodes (`model@k`). Their cost counts against
    the budget; the row's cost and tokens are the answer's call, as `fit` expects.
    """
    if concurrency < 1:
        raise CollectError("--concurrency must be at least 1")
    if samples != 1:
        try:
            check_k(samples, "--samples")
        except InvalidInput as exc:
            raise CollectError(str(exc)) from None
    if max_cost_usd is not None and not max_cost_usd > 0:
        raise CollectError("--max-cost-usd must be positive")
    out = Path(out)
    if not out.parent.is_dir():
        raise CollectError(f"output folder {out.parent} does not exist")
    models, order_note = cascade_models(config, cascade)
    reference = config.cascades[cascade].reference
    notes = [order_note] if order_note else []
    if isinstance(grader, str):
        grader = parse_grader(grader, config.models)
    needs_reference = grader.needs_reference if grader is not None else True
    items = load_dataset(dataset, needs_reference)
    tasks = [it.task for it in items if it.task]
    kind = (grader.kind if grader is not None else None) or detect_kind(
        tasks[0] if tasks else None, [it.reference for it in items[:500]], []
    )
    if grader is None:
        grader = default_grader(kind)
    judged = grader.paid
    existing = prepare_output(out, models)
    if existing.repaired:
        notes.append(f"{out}: {existing.repaired}")
    todo = [it for it in items if it.id not in existing.ids]
    status = Status(total=len(todo))
    budget = _Budget(max_cost_usd)
    failed = dict.fromkeys(models, 0)
    ungraded: list[str] = []
    unpriced = 0
    own = backends is None
    if backends is None:
        from upstreams.factory import make_backend

        backends = {m: make_backend(m, config.models[m]) for m in models}
    call_params = dict(params or {})

    async def sampled(m: str, messages: list[dict]) -> tuple[list[str | None], float]:
        """k - 1 further answers of model `m` and what they cost."""
        if samples < 2:
            return [], 0.0
        backend = backends[m]
        if config.models[m].sampling == "n" and samples > 2:
            got = [await backend.complete(messages, {**call_params, "n": samples - 1})]
            texts = [c["message"]["content"] for c in got[0].extra.get("choices") or []]
            texts = texts or ([got[0].text] if got[0].ok else [])
        else:
            one_call = [backend.complete(messages, call_params) for _ in range(samples - 1)]
            got = list(await asyncio.gather(*one_call))
            texts = [r.text if r.ok else None for r in got]
        texts += [None] * (samples - 1 - len(texts))
        return texts[: samples - 1], sum(_finite(r.cost_usd) or 0.0 for r in got)

    async def one(item: Item) -> tuple[dict | None, float]:
        nonlocal unpriced
        results, extra = await asyncio.gather(
            asyncio.gather(*(backends[m].complete(item.messages, call_params) for m in models)),
            asyncio.gather(*(sampled(m, item.messages) for m in models)),
        )

        # a pairwise grader compares each answer with the reference model's (itself: a tie)
        versus = results[models.index(reference)] if grader.pairwise else None
        versus_text = versus.text if versus is not None and versus.ok else None

        async def graded(m: str, r: CallResult) -> Grade | None:
            if not r.ok:
                return None
            if versus_text is not None and m == reference:
                return Grade(grader.extract(r.text, kind), True, quality=0.5)
            return await grader.grade(r.text, item.reference, item.messages, kind, versus_text)

        grades = await asyncio.gather(*(graded(m, r) for m, r in zip(models, results, strict=True)))
        cost = sum(c for _, c in extra)
        for m, r, g in zip(models, results, grades, strict=True):
            if r.ok and r.cost_usd is None:
                unpriced += 1
            cost += _finite(r.cost_usd) or 0.0
            if g is not None:
                status.grader_cost_usd += _finite(g.cost_usd) or 0.0
                cost += _finite(g.cost_usd) or 0.0
            if not r.ok:
                failed[m] += 1
        if any(g is not None and g.error for g in grades):
            ungraded.append(item.id)
            errs = "; ".join(sorted({g.error for g in grades if g is not None and g.error}))
            if len(ungraded) <= 3:
                notes.append(f"item {item.id!r} not written: {errs}")
            return None, cost
        row = {
            "id": item.id,
            "task": item.task,
            "messages": item.messages,
            "reference": item.reference,
            "grader": grader.spec,
            "models": {
                m: _entry(r, g, kind, judged) | ({"samples": s} if samples > 1 else {})
                for m, r, g, (s, _) in zip(models, results, grades, extra, strict=True)
            },
        }
        return row, cost

    queue = iter(todo)
    with out.open("a", encoding="utf-8") as sink:

        async def worker() -> None:
            for item in queue:
                if not await budget.admit():
                    return
                row, cost = await one(item)
                await budget.done(cost)
                status.cost_usd += cost
                if row is not None:
                    sink.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                    sink.flush()
                    status.written += 1
                if on_row is not None:
                    on_row(status)

        if on_start is not None:
            on_start(status, models)
        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, max(1, len(todo))))))
        finally:
            if own:
                await asyncio.gather(*(b.aclose() for b in backends.values()))
            await grader.aclose()
    done = status.written + len(ungraded)
    if unpriced:
        notes.append(
            f"{unpriced} call(s) had no known price (cost_usd null): give the models "
            "price_in_per_mtok / price_out_per_mtok; they do not count against the budget"
        )
    return Summary(
        out=out,
        models=models,
        grader=grader.spec,
        kind=kind,
        items=len(items),
        already=len(items) - len(todo),
        written=status.written,
        not_started=len(todo) - done,
        ungraded=ungraded,
        failed_calls={m: n for m, n in failed.items() if n},
        unpriced_calls=unpriced,
        cost_usd=status.cost_usd,
        grader_cost_usd=status.grader_cost_usd,
        prior_cost_usd=existing.cost_usd,
        stopped_by_budget=budget.stopped,
        elapsed_s=status.elapsed_s,
        notes=notes,
    )
