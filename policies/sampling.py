"""Sampled nodes, `model@k`: one model sampled k times, answered by the samples' vote.

Self-consistency (Yue et al., ICLR 2024): when k samples of the same model agree, the answer
is more likely right. A sampled node's answer is the majority of the extracted answers (ties
go to the earliest, so the first sample, the recorded answer of a trace, wins a tie); for free
text it is the medoid under a graded agreement (by default the character 3-gram agreement of
policies/freetext.py, the one the open-ended calibrators read; any agreement in [0, 1] plugs
in, normalised exact match among them). Its confidence is the log of the vote share (free text:
of the mean pairwise agreement), smoothed as (share k + 1/2) / (k + 1), so that it reads like
a log-probability and a unanimous vote is not an infinitely sure one (the posterior reads a
confidence as log-odds: unsmoothed, a share of 1 would sit at its clip, far from the rest);
it is calibrated like any other signal. Calibration builds trace columns with this rule and the
proxy applies it to live samples, so a sampled node is an ordinary node to the policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policies.errors import InvalidInput
from policies.freetext import agreement as text_agreement
from policies.tiers import TIER_PREFIX

SAMPLED_SEP = "@"
MAX_SAMPLES = 128  # what an upstream's `n` may be (the proxy's limit on `n`)

Agreement = Callable[[str, str], float]  # two answers -> agreement in [0, 1]


class SamplingError(InvalidInput):
    """A sampled node that cannot be: k < 2, k too large, `@k` on a tier, a malformed name."""


@dataclass(frozen=True, slots=True)
class Vote:
    """The outcome of one sampled node: which sample is answered and how strongly."""

    index: int  # the sample whose answer the node gives
    k: int  # samples asked for
    votes: int  # samples that agree with it (itself included; free text: rounded soft votes)
    share: float  # votes / k (free text: the medoid's soft vote share)
    agreement: float  # mean pairwise agreement of the answered samples (1 for a single one)
    confidence: float  # the node's raw signal: share_confidence(share or agreement, k)

    def as_dict(self) -> dict:
        """What the response's `cascade` object shows of the vote."""
        return {
            "k": self.k,
            "votes": self.votes,
            "share": round(self.share, 6),
            "agreement": round(self.agreement, 6),
            "chosen_sample": self.index,
        }


def share_confidence(x: float, k: int) -> float:
    """The confidence of a vote share (or mean agreement) `x` among `k` samples: the log of
    the smoothed share (x k + 1/2) / (k + 1)."""
    return math.log((x * k + 0.5) / (k + 1))


def sampled_name(model: str, k: int) -> str:
    """The node name of `model` sampled `k` times, e.g. `llama-8b@5`."""
    check_k(k, model)
    if model.startswith(TIER_PREFIX):
        raise SamplingError(f"{model}{SAMPLED_SEP}{k}: a tier cannot be sampled (@k on a tier)")
    return f"{model}{SAMPLED_SEP}{k}"


def check_k(k: object, where: str) -> int:
    """`k` as a sample count, or a SamplingError naming `where`."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 2 or k > MAX_SAMPLES:
        raise SamplingError(
            f"{where}: k must be an integer from 2 to {MAX_SAMPLES} (k = 1 is the model itself), "
            f"got {k!r}"
        )
    return k


def is_sampled(name: str) -> bool:
    """True for a node name of the form `model@k` (k digits)."""
    model, sep, tail = name.rpartition(SAMPLED_SEP)
    return bool(sep and model and tail.isdigit())


def parse_sampled(name: str) -> tuple[str, int] | None:
    """(model, k) of a node name `model@k`; None for any other name. A malformed `@k`
    (`a@0`, `a@x`, `tier:a+b@3`) is a SamplingError."""
    model, sep, tail = name.rpartition(SAMPLED_SEP)
    if not sep:
        return None
    if not model:
        raise SamplingError(f"{name!r}: no model before {SAMPLED_SEP!r}")
    try:
        k = int(tail)
    except ValueError:
        raise SamplingError(f"{name!r}: k after {SAMPLED_SEP!r} must be an integer") from None
    check_k(k, name)
    if model.startswith(TIER_PREFIX):
        raise SamplingError(f"{name!r}: a tier cannot be sampled (@k on a tier)")
    return model, k


def majority(extracted: Sequence[str | None]) -> Vote | None:
    """The majority of extracted answers (None: no answer, a vote for nothing); ties go to
    the earliest sample. None when no sample has an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(extracted):
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
            first.setdefault(a, i)
    if not counts:
        return None
    top = max(counts, key=lambda a: (counts[a], -first[a]))
    k = len(extracted)
    answered = sum(counts.values())
    pairs = answered * (answered - 1) / 2
    agree_pairs = sum(c * (c - 1) / 2 for c in counts.values())
    share = counts[top] / k
    return Vote(
        index=first[top],
        k=k,
        votes=counts[top],
        share=share,
        agreement=agree_pairs / pairs if pairs else 1.0,
        confidence=share_confidence(share, k),
    )


def exact_agreement(a: str, b: str) -> float:
    """Normalised exact match (the default agreement of free text): 1 or 0. The inputs are
    already normalised (policies.answers.normalise_text)."""
    return 1.0 if a == b else 0.0


def graded_agreement(a: str, b: str) -> float:
    """The default agreement of free text: Jaccard of character 3-grams (policies/freetext.py)."""
    return text_agreement(a, b) or 0.0


def medoid(texts: Sequence[str | None], agree: Agreement = graded_agreement) -> Vote | None:
    """The medoid of free-text answers: the one with the highest summed agreement with the
    others (ties: the earliest). Its confidence is the log of the mean pairwise agreement
    of the answered samples. None when no sample has an answer."""
    answered = [i for i, t in enumerate(texts) if t is not None]
    if not answered:
        return None
    n = len(answered)
    m = [[1.0] * n for _ in range(n)]
    for x in range(n):
        for y in range(x + 1, n):
            a = float(agree(texts[answered[x]], texts[answered[y]]))  # type: ignore[arg-type]
            if not 0.0 <= a <= 1.0 or a != a:
                raise SamplingError(f"an agreement must lie in [0, 1], got {a!r}")
            m[x][y] = m[y][x] = a
    totals = [sum(row) for row in m]  # self-agreement 1 included: a soft vote count
    best = max(range(n), key=lambda x: (totals[x], -x))
    k = len(texts)
    pairs = n * (n - 1) / 2
    mean = sum(m[x][y] for x in range(n) for y in range(x + 1, n)) / pairs if pairs else 1.0
    return Vote(
        index=answered[best],
        k=k,
        votes=round(totals[best]),
        share=totals[best] / k,
        agreement=mean,
        confidence=share_confidence(mean, k),
    )


def vote(extracted: Sequence[str | None], kind: str, agree: Agreement | None = None) -> Vote | None:
    """The node's vote over its k samples' extracted answers: the majority for choices and
    numbers, the medoid for free text (`agree`, the graded 3-gram agreement by default)."""
    if kind == "text":
        return medoid(extracted, agree or graded_agreement)
    return majority(extracted)
