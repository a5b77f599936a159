"""Answer extraction and agreement: the one implementation used by calibration and serving.

Two answers agree when their extracted forms are equal. Three kinds of answer:
- "choice": a multiple-choice letter, also inside a sentence ("The answer is (B).");
- "number": the final number of a chain of thought ("#### 18", "$18.", "18 bolts");
- "text": short free text, normalised (case, punctuation, articles, whitespace).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

KINDS = ("choice", "number", "text")
_TASK_KINDS = {
    "mmlu": "choice",
    "medmcqa": "choice",
    "arc": "choice",
    "arc_challenge": "choice",
    "hellaswag": "choice",
    "gsm8k": "number",
    "math": "number",
}

_LETTERS = "ABCDEFGH"
_CHOICE_PATTERNS = [
    # a bare letter, optionally decorated: "B", "(B)", "B)", "B.", "**B**", "B: text"
    re.compile(r"^\W{0,3}([A-H])(?:\W|$)"),
    # "answer is (B)", "Answer: B", "correct option is B", "choice B"
    re.compile(
        r"(?:answer|option|choice)\s*(?:is|:|would be|=)?\s*(?:option\s*)?\W{0,2}([A-H])\b",
        re.IGNORECASE,
    ),
    # "(B)" anywhere
    re.compile(r"\(([A-H])\)"),
]
_FINAL_MARKERS = [
    re.compile(r"####\s*([^\n]*)"),
    re.compile(r"\\boxed\{([^}]*)\}"),
    re.compile(r"answer\s*(?:is|:)\s*([^\n]*)", re.IGNORECASE),
]
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def kind_for_task(task: str | None) -> str | None:
    """The answer kind a known task implies ("mmlu" -> "choice"), None if unknown."""
    if not task:
        return None
    key = task.lower()
    if key in _TASK_KINDS:
        return _TASK_KINDS[key]
    return next((k for t, k in _TASK_KINDS.items() if key.startswith(t)), None)


def detect_kind(
    task: str | None, references: Iterable[str | None], answers: Iterable[str | None]
) -> str:
    """Choose the answer kind of a task: by its name if known, else by what the data looks like.

    References decide when present (all letters: choice; all numbers: number); otherwise
    short answers that are mostly a lone letter mean choice.
    """
    known = kind_for_task(task)
    if known:
        return known
    refs = [r.strip() for r in references if r is not None and r.strip()]
    if refs:
        if all(len(r) == 1 and r.upper() in _LETTERS for r in refs):
            return "choice"
        if all(_normalise_number(r) is not None for r in refs):
            return "number"
        return "text"
    sample = [a for a in answers if a]
    if sample:
        letters = sum(bool(_CHOICE_PATTERNS[0].match(a.strip())) for a in sample)
        if letters / len(sample) > 0.8:
            return "choice"
    return "text"


def extract_choice(text: str | None) -> str | None:
    """The chosen letter, or None when the answer names none."""
    if not text:
        return None
    stripped = text.strip()
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(stripped)
        if match:
            return match.group(1).upper()
    return None


def _normalise_number(token: str) -> str | None:
    """ "$1,234.50" -> "1234.5"; "18.0" -> "18"; None if not a number."""
    cleaned = token.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(value.to_integral_value())
    return format(value.normalize(), "f")


def extract_number(text: str | None) -> str | None:
    """The final numeric answer of a chain of thought: after a final-answer marker if
    there is one ("#### 18", "\\boxed{18}", "The answer is 18"), else the last number."""
    if not text:
        return None
    for marker in _FINAL_MARKERS:
        found = marker.findall(text)
        for segment in reversed(found):
            numbers = _NUMBER.findall(segment)
            if numbers:
                return _normalise_number(numbers[0])
    numbers = _NUMBER.findall(text)
    for token in reversed(numbers):
        value = _normalise_number(token)
        if value is not None:
            return value
    return None


def has_final_marker(text: str | None) -> bool:
    """True when a chain of thought states its final answer explicitly (not truncated)."""
    return bool(text) and any(m.search(text) for m in _FINAL_MARKERS)


def normalise_text(text: str | None) -> str | None:
    """SQuAD-style normal form: lower case, no punctuation or articles, single spaces."""
    if text is None:
        return None
    lowered = text.lower().translate(_PUNCT)
    words = _ARTICLES.sub(" ", lowered).split()
    return " ".join(words) or None


def extract_answer(text: str | None, kind: str) -> str | None:
    """The comparable form of one answer; None when nothing can be extracted."""
    if kind == "choice":
        return extract_choice(text)
    if kind == "number":
        return extract_number(text)
    if kind == "text":
        return normalise_text(text)
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")


def answers_agree(a: str | None, b: str | None) -> bool:
    """Two extracted answers agree when both exist and are equal."""
    return a is not None and a == b
