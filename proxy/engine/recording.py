"""Turn what a request did into ledger records and hand them to the writer (never blocks).

Every request that reached an upstream is recorded once, whatever its ending: answered,
every node failed, or the client hung up (the calls already made are kept, status 499).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from policies.freetext import token_logprobs_summary
from proxy.engine.cascade import CascadeRun, NodeCall
from proxy.ledger.records import CallRecord, RequestRecord
from upstreams.base import CallResult

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.ledger.writer import LedgerWriter


_NO_SUMMARY: tuple[None, None, None, None] = (None, None, None, None)


def _call_record(order: int, model: str, backend: str | None, call: NodeCall | None,
                 result: CallResult, tier: NodeCall | None = None) -> CallRecord:  # fmt: skip
    """One upstream call's row; a tier member carries its tier's p_correct and decision,
    and in `agreement` whether it voted for the tier's answer. A sampled node's call (one
    `n: k` call, or each of k parallel calls) carries k in `samples` and the vote share. The
    answer's token-logprob summary goes to `lp_*` (None where none was read: the upstream
    sent no logprobs, or the call's answers are only voted on: a sampled node's `n: k` call,
    an explored request's further samples)."""
    answered = [call] if call is not None else []
    node = tier or call
    summary = call.logprob_summary if call is not None else _passthrough_summary(result)
    mean, low, q05, q25 = summary or _NO_SUMMARY
    return CallRecord(
        order=order,
        model=model,
        backend=backend,
        status="ok" if result.ok else (result.error or "error"),
        http_status=result.status,
        tokens_in=result.tokens_in,
        tokens_out=result.tokens_out,
        cost_usd=result.cost_usd,
        latency_ms=result.latency_ms,
        ttft_ms=result.ttft_ms,
        confidence=call.confidence if answered else result.confidence,
        p_correct=node.p_correct if node is not None else None,
        agreement=None
        if tier is None or call is None or call.extracted is None
        else float(call.extracted == tier.extracted),
        decision=node.decision if node is not None else None,
        error=result.error_detail or result.error,
        node=node.node if node is not None else None,
        samples=node.samples if node is not None else None,
        vote_share=node.vote.share if node is not None and node.vote is not None else None,
        lp_mean=mean,
        lp_min=low,
        lp_q05=q05,
        lp_q25=q25,
    )


def _passthrough_summary(result: CallResult) -> tuple[float, float, float, float] | None:
    """A passthrough call's summary: no engine read one, so it is read here, as the engine
    reads it (the recorded one of a replay, else the upstream's token logprobs)."""
    if not result.ok:
        return None
    return result.logprob_summary or token_logprobs_summary(result.token_logprobs)


class Recording(Protocol):
    """What a ledger entry needs of the serving process (the HTTP layer's ProxyState)."""

    ledger: LedgerWriter | None
    config: Config
    reference_prices: dict[str, tuple[float, float] | None]
    key_names: dict[str, str]
    secrets: frozenset[str]


class LedgerEntry:
    """One request's ledger record, written at most once."""

    def __init__(
        self, state: Recording, request_id: str, key: str | None, model: str, stream: bool
    ) -> None:
        self.state = state
        self.request_id = request_id
        self.key = key
        self.model = model
        self.stream = stream
        self.ts = time.time()
        self.started = time.perf_counter()
        self.written = False

    def _submit(self, record: RequestRecord) -> None:
        if self.written or self.state.ledger is None:
            return
        self.written = True
        self.state.ledger.submit(record)

    def _backend(self, model: str) -> str | None:
        cfg = self.state.config.models.get(model)
        return cfg.backend if cfg else None

    def cascade_done(self, run: CascadeRun, status: int, error: str | None) -> None:
        calls = [
            _call_record(i, m.model, self._backend(m.model), m, m.result, c if c.members else None)
            for i, (c, m) in enumerate((c, m) for c in run.calls for m in c.model_calls())
        ]
        tokens_in, tokens_out = run.tokens
        answer = run.answer
        reference_cost = run.reference_cost(self.state.reference_prices.get(run.cascade))
        self._submit(
            RequestRecord(
                request_id=self.request_id,
                ts=self.ts,
                api_key=self.key,
                key_label=self.state.key_names.get(self.key),
                cascade=run.cascade,
                model_requested=self.model,
                policy_hash=run.policy_hash,
                status=status,
                chosen_model=answer.model if answer else None,
                n_calls=len(calls),  # upstream calls: a tier counts each of its models
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                cost_usd=run.cost_usd,
                reference_cost_usd=reference_cost,
                latency_ms=(time.perf_counter() - self.started) * 1000.0,
                overhead_ms=run.overhead_ms,
                error=error,
                stream=self.stream,
                calls=calls,
            )
        )

    def call_done(self, model: str, result: CallResult, status: int, error: str | None) -> None:
        """A passthrough request: one model, no cascade."""
        self._submit(
            RequestRecord(
                request_id=self.request_id,
                ts=self.ts,
                api_key=self.key,
                key_label=self.state.key_names.get(self.key),
                cascade=None,
                model_requested=self.model,
                policy_hash=None,
                status=status,
                chosen_model=model if result.ok else None,
                n_calls=1,
                tokens_in=result.tokens_in or 0,
                tokens_out=result.tokens_out or 0,
                cost_usd=result.cost_usd,
                reference_cost_usd=result.cost_usd,
                latency_ms=(time.perf_counter() - self.started) * 1000.0,
                overhead_ms=0.0,
                error=error,
                stream=self.stream,
                calls=[_call_record(0, model, self._backend(model), None, result)],
            )
        )
