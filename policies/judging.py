"""The LLM judge's protocol (pure): the prompt that asks a model whether an answer is right,
and the reading of its yes/no verdict. `cascade collect --grader judge:MODEL` and the
proxy's exploration (`explore_grader: judge:MODEL`) both use it, so a label means the same
thing whichever path produced it.
"""

from __future__ import annotations

import re
from typing import Any

JUDGE_SYSTEM = (
    "You grade answers to questions. Reply with one word: yes if the candidate answer is "
    "correct, no if it is not."
)
JUDGE_PARAMS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 16}
_VERDICT = re.compile(r"^\W*(yes|no|correct|incorrect|true|false)\b", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def judge_messages(question: str | None, candidate: str, reference: str | None) -> list[dict]:
    """The chat messages asking whether `candidate` answers `question` correctly."""
    parts = [f"Question:\n{(question or '').strip() or '(no question given)'}"]
    if reference is not None:
        parts.append(f"Reference answer:\n{reference}")
    parts.append(f"Candidate answer:\n{candidate}")
    parts.append("Is the candidate answer correct? Answer yes or no.")
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def parse_verdict(text: str | None) -> bool | None:
    """yes/no (or correct/incorrect, true/false) at the start, else a lone yes or no."""
    if not text:
        return None
    match = _VERDICT.match(text)
    if match:
        return match.group(1).lower() in ("yes", "correct", "true")
    words = {w.lower() for w in _YES_NO.findall(text)}
    return words == {"yes"} if len(words) == 1 else None
