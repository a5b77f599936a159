"""The LLM judge's protocols (pure): the prompt that asks a model whether an answer is right
and the reading of its yes/no verdict (the proxy's exploration, `explore_grader:
judge:MODEL`), and the graded ones `cascade collect --grader judge:MODEL` records as
`quality`: a pairwise A/B comparison with the reference model's answer (a probability from
the verdict's logprob, asked in both orders and averaged against position bias) and a 1-10
rubric score.
"""

from __future__ import annotations

import math
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


# ------------------------------------------------------------------ graded judging (quality)

PAIRWISE_SYSTEM = (
    "You compare two responses to the same instruction. Reply with one letter: A if "
    "response A is better, B if response B is better."
)
RUBRIC_SYSTEM = (
    "You grade responses to instructions. Reply with one integer from 1 (useless or wrong) "
    "to 10 (correct, complete and helpful)."
)
_CHOICE = re.compile(r"^\W*(?:response\s+)?([AB])\b", re.IGNORECASE)
_SCORE = re.compile(r"^\W*(10|[1-9])\b")


def pairwise_messages(question: str | None, candidate: str, versus: str) -> list[dict]:
    """The chat messages asking whether `candidate` (A) answers `question` better than
    `versus` (B), the reference model's answer to the same prompt (AlpacaEval's protocol)."""
    parts = [
        f"Instruction:\n{(question or '').strip() or '(no instruction given)'}",
        f"Response A:\n{candidate}",
        f"Response B:\n{versus}",
        "Which response is better? Answer A or B.",
    ]
    return [
        {"role": "system", "content": PAIRWISE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def parse_choice(text: str | None) -> str | None:
    """`A` or `B` at the start of the judge's reply (`Response B`, `**A**`), else None."""
    match = _CHOICE.match(text or "")
    return match.group(1).upper() if match else None


def pairwise_quality(choice: str, first_logprob: float) -> float:
    """P(A is better) from the judge's chosen letter and that token's logprob: the letter's
    probability, or its complement when the judge chose B (the rest of the mass is taken
    to be on the other letter)."""
    p = float(min(1.0, max(0.0, math.exp(min(first_logprob, 0.0)))))
    return p if choice == "A" else 1.0 - p


def debiased_quality(p_first: float, p_swapped: float) -> float:
    """P(the candidate is better) averaged over both orders: `p_first` is P(A is better) with
    the candidate as A, `p_swapped` the same with the candidate as B. A judge's taste for a
    position (MT-Bench, AlpacaEval) cancels out: one that always says A scores 0.5."""
    return (p_first + (1.0 - p_swapped)) / 2.0


def rubric_messages(question: str | None, candidate: str, reference: str | None) -> list[dict]:
    """The chat messages asking for a 1-10 score of `candidate` (with the reference answer
    when one is known): the graded label when the judge gives no logprobs."""
    parts = [f"Instruction:\n{(question or '').strip() or '(no instruction given)'}"]
    if reference is not None:
        parts.append(f"Reference answer:\n{reference}")
    parts.append(f"Response:\n{candidate}")
    parts.append("Score the response from 1 to 10. Reply with the number only.")
    return [
        {"role": "system", "content": RUBRIC_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def parse_rubric(text: str | None) -> float | None:
    """The reply's leading score 1-10 normalised to [0, 1] ((s - 1) / 9), else None."""
    match = _SCORE.match(text or "")
    return (int(match.group(1)) - 1) / 9.0 if match else None
