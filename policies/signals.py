"""Confidence from token logprobs: the one implementation calibration and serving share.

The traces' `confidence` is the log-probability of the answer itself (the letter of a
multiple-choice answer), so at serve time the same quantity is read off the returned
tokens: the log-probability of the tokens that spell the extracted answer, found from the
end of the text (a chain of thought states its answer last).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from policies.answers import extract_answer


def _spelled(answer: str, kind: str) -> re.Pattern[str]:
    """Where `answer` stands as a whole letter or number (not inside a word or a number)."""
    if kind == "choice":
        return re.compile(rf"(?<![A-Za-z]){re.escape(answer)}(?![A-Za-z])")
    return re.compile(rf"(?<![\d.]){re.escape(answer)}(?![\d])")


def answer_confidence(
    text: str | None, token_logprobs: Sequence[tuple[str, float]] | None, kind: str
) -> float | None:
    """Sum of the logprobs of the last tokens that spell the extracted answer.

    None when there are no logprobs or no answer can be extracted. For free text ("text")
    the whole answer is the answer, so every token counts.
    """
    if not token_logprobs or not text:
        return None
    if kind == "text":
        return float(sum(lp for _, lp in token_logprobs))
    answer = extract_answer(text, kind)
    if answer is None:
        return None
    pattern = _spelled(answer, kind)
    total, window = 0.0, ""
    for token, logprob in reversed(token_logprobs):  # grow a window back from the end
        window = token + window
        total += logprob
        if pattern.search(window.replace(",", "").replace("$", "")):
            return float(total)
    return None
