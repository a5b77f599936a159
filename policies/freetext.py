"""Signals of open-ended answers: the one implementation calibration and serving share.

Two essays never agree after normalised exact match and an API may return no logprobs, so
for free text the policy reads:
- graded agreement of two answers in [0, 1]: Jaccard similarity of their character 3-gram
  sets (or of their word-bigram sets); no model download, about a millisecond for two
  1,000-token answers;
- features of one answer: its length in tokens and relative to the prompt, truncation
  (`finish_reason == "length"`), refusal, hedging, list or heading structure, its mean
  word length and its bold emphasis (the judges of open-ended answers reward long,
  structured answers; on alpaca-fusechat train the mean word length separates a model's
  good answers from the others best of all, AUROC 0.60-0.68);
- summaries of token logprobs beyond the mean: the minimum and low quantiles (on long
  outputs the mean is dominated by easy tokens; Gupta et al. 2024).

Pure (text in, numbers out): the fit computes them for whole trace columns, the proxy for
one live answer, with the same functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

CHAR_N = 3  # character n-gram order of `agreement` (separated best on alpaca-fusechat train)
MAX_CHARS = 12_000  # longer answers are compared on their first MAX_CHARS characters
AGREEMENT_METHODS = ("char", "word")

_WORD = re.compile(r"\w+")
_REFUSAL = re.compile(
    r"\b(?:i\s*(?:'m|am)\s*(?:sorry|unable|not able)|i\s*(?:can\s*not|can't|cannot|won't)"
    r"|as an ai\b|i\s*(?:do not|don't)\s*have (?:access|the ability)"
    r"|i\s*(?:must|have to)\s*decline)",
    re.IGNORECASE,
)
# The lookahead on the words' first letters (same case rules) lets the scan skip most
# positions without trying every word: the same matches in half the time.
_HEDGE = re.compile(
    r"\b(?=[mplunirag])(?:might|may|perhaps|possibly|probably|likely|unclear|uncertain|not sure"
    r"|it depends|i think|i believe|approximately|roughly|generally)\b",
    re.IGNORECASE,
)
_STRUCTURE = re.compile(r"^\s*(?:[-*+]\s|\d+[.)]\s|#{1,6}\s)", re.MULTILINE)
_EMPHASIS = "**"  # markdown bold, as chat models mark key terms
REFUSAL_WINDOW = 300  # a refusal says so at the start


def char_shingles(text: str, n: int = CHAR_N) -> np.ndarray:
    """The sorted distinct character n-grams (of the UTF-8 bytes, lower case, whitespace
    collapsed) of the text, each packed into one integer: numpy, not a set of strings, so
    two 1,000-token answers compare in about a millisecond."""
    if not 1 <= n <= 8:
        raise ValueError(f"n-gram order must be 1..8, got {n}")
    raw = " ".join(text[:MAX_CHARS].lower().split()).encode()
    x = np.frombuffer(raw, dtype=np.uint8).astype(np.uint64 if n > 4 else np.uint32)
    if len(x) < n:
        return np.unique(x[:0] if not len(x) else _pack(x, len(x)))
    codes = _pack(x, n)
    codes.sort()
    return codes[np.concatenate(([True], codes[1:] != codes[:-1]))]


def _pack(x: np.ndarray, n: int) -> np.ndarray:
    """Every run of n consecutive bytes of x as one integer (8 bits per byte)."""
    shift = x.dtype.type(8)
    codes = x[: len(x) - n + 1].copy()
    for k in range(1, n):
        codes = (codes << shift) | x[k : len(x) - n + 1 + k]
    return codes


def word_shingles(text: str, n: int = 2) -> set[tuple[str, ...]]:
    """The set of word n-grams (lower case, punctuation dropped)."""
    words = _WORD.findall(text[:MAX_CHARS].lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return set(zip(*(words[i:] for i in range(n)), strict=False))


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| of two sets; 0 when either is empty."""
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def sorted_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """jaccard of two sorted arrays of distinct values; 0 when either is empty."""
    if not len(a) or not len(b):
        return 0.0
    pos = np.minimum(np.searchsorted(b, a), len(b) - 1)
    inter = int(np.count_nonzero(b[pos] == a))
    return inter / (len(a) + len(b) - inter)


def agreement(a: str | None, b: str | None, method: str = "char") -> float | None:
    """Graded agreement of two free-text answers in [0, 1]; None when either is missing.

    "char": Jaccard of character 3-gram sets (robust to inflection and formatting);
    "word": Jaccard of word-bigram sets.
    """
    if a is None or b is None:
        return None
    if method == "char":
        return sorted_jaccard(char_shingles(a), char_shingles(b))
    if method == "word":
        return jaccard(word_shingles(a), word_shingles(b))
    raise ValueError(f"unknown agreement method {method!r}; expected one of {AGREEMENT_METHODS}")


def shingles_of(text: str | None) -> np.ndarray | None:
    """The character shingles `agreement` compares (None for no answer): computed once per
    answer, so each further pair costs one sorted intersection."""
    return None if text is None else char_shingles(text)


def agreement_row(new: np.ndarray | None, seen: Sequence[np.ndarray | None]) -> list[float | None]:
    """The char-3-gram agreement of one answer's shingles with each of `seen` (None where
    either is missing): what the proxy computes as an answer arrives."""
    return [None if new is None or s is None else sorted_jaccard(new, s) for s in seen]


def pairwise_agreement(texts: Sequence[Sequence[str | None]]) -> np.ndarray:
    """(N, M, M) agreement of every pair of answers per row (rows of M answers): 1 on the
    diagonal (an answer agrees with itself), 0 where either answer is missing. The same
    agreement_row the proxy uses, over each answer's shingles computed once."""
    n_rows = len(texts)
    n = len(texts[0]) if n_rows else 0
    out = np.zeros((n_rows, n, n))
    idx = np.arange(n)
    out[:, idx, idx] = 1.0
    for r, row in enumerate(texts):
        sh = [shingles_of(t) for t in row]
        for i in range(1, n):
            for j, a in enumerate(agreement_row(sh[i], sh[:i])):
                if a is not None:
                    out[r, i, j] = out[r, j, i] = a
    return out


# ---------------------------------------------------------------- one answer's features

FEATURES = (
    "log_tokens",
    "log_tokens_sq",
    "log_rel_length",
    "truncated",
    "refusal",
    "hedging",
    "structure",
    "word_length",
    "emphasis",
)
N_TEXT_FEATURES = len(FEATURES)
CHARS_PER_TOKEN = 4.0  # a token count estimated from characters where none was returned


def word_count(text: str | None) -> int:
    return len(_WORD.findall(text)) if text else 0


def prompt_text(messages: Sequence[Mapping[str, object]]) -> str:
    """The prompt of a chat request or a trace row: every message's text (system ones
    included), one message a line. The one definition the fit, the replay and the proxy
    read (the word count of the relative answer length, the prompt-difficulty root state),
    so they see the same prompt. A content given as parts (OpenAI's list form) reads as its
    text parts, one a line, as upstreams/common.message_text reads it; None as empty."""
    return "\n".join(_content_text(m.get("content")) for m in messages)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def answer_features(
    text: str | None,
    tokens_out: float | None = None,
    prompt_words: int | None = None,
    finish_reason: str | None = None,
) -> tuple[float, ...] | None:
    """FEATURES of one answer (None for no answer). `tokens_out` is the returned token
    count (estimated from characters when None); `prompt_words` the prompt's word count
    (the relative length is 0 without it); `finish_reason` the upstream's."""
    if text is None:
        return None
    if tokens_out is None or tokens_out != tokens_out:
        tokens_out = len(text) / CHARS_PER_TOKEN
    lt = math.log1p(float(tokens_out))
    found = _WORD.findall(text)
    words = len(found)
    word_length = sum(map(len, found)) / words if words else 0.0
    emphasis = math.log1p(text.count(_EMPHASIS) / 2)
    rel = math.log1p(words) - math.log1p(prompt_words) if prompt_words is not None else 0.0
    refusal = 1.0 if _REFUSAL.search(text[:REFUSAL_WINDOW]) else 0.0
    hedging = 100.0 * len(_HEDGE.findall(text)) / max(words, 1)
    structure = math.log1p(len(_STRUCTURE.findall(text)))
    cut = 1.0 if truncated(finish_reason) else 0.0
    return (lt, lt * lt, rel, cut, refusal, hedging, structure, word_length, emphasis)


def truncated(finish_reason: str | None) -> bool:
    """The upstream stopped at its token limit: the answer is cut off."""
    return finish_reason == "length"


# ---------------------------------------------------------------- token logprobs

LOGPROB_SUMMARY = ("mean", "min", "q05", "q25")  # the keys of a trace's `logprob_summary`
# The summary as answer features a text calibrator may read (policies/textcal.py).
LOGPROB_FEATURES = tuple(f"logprob_{k}" for k in LOGPROB_SUMMARY)


def logprob_summary(logprobs: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    """(mean, minimum, 5% and 25% quantiles) of an answer's token logprobs; None without
    any, or when one is not finite (an upstream's -inf or nan would poison every summary).

    Quantiles by the nearest-rank rule (no interpolation: exact values of the answer's own
    logprobs), found by a partial sort: about a tenth of a millisecond for 1,000 tokens."""
    if logprobs is None or len(logprobs) == 0:
        return None
    # a positive logprob is an upstream's rounding: clipped, so every summary is <= 0 (the
    # trace format refuses a positive one)
    values = np.minimum(np.asarray(logprobs, dtype=float), 0.0)
    if not np.isfinite(values).all():
        return None
    n = len(values)
    r05, r25 = _rank(0.05, n), _rank(0.25, n)
    low = np.partition(values, (0, r05, r25))
    return (float(values.mean()), float(low[0]), float(low[r05]), float(low[r25]))


def _rank(p: float, n: int) -> int:
    """The 0-based index of the nearest-rank p-quantile among n sorted values."""
    return min(n - 1, max(0, math.ceil(p * n) - 1))


def summary_as_dict(summary: Sequence[float] | None) -> dict[str, float] | None:
    """A summary as the trace format's `logprob_summary` object (None stays None)."""
    return None if summary is None else dict(zip(LOGPROB_SUMMARY, summary, strict=True))


def summary_from_dict(recorded: dict | None) -> tuple[float, float, float, float] | None:
    """A trace's (validated) `logprob_summary` object as the tuple the policy reads."""
    if recorded is None:
        return None
    mean, low, q05, q25 = (float(recorded[k]) for k in LOGPROB_SUMMARY)
    return (mean, low, q05, q25)


def token_logprobs_summary(
    tokens: Sequence[tuple[str, float]] | None,
) -> tuple[float, float, float, float] | None:
    """logprob_summary of an upstream's (token, logprob) pairs (upstreams/ parse them so)."""
    return logprob_summary([lp for _, lp in tokens]) if tokens else None
