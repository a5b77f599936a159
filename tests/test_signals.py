"""Serve-time confidence from token logprobs (policies/signals.py)."""

from __future__ import annotations

import pytest

from policies.signals import answer_confidence


def test_a_lone_letter_carries_its_own_logprob() -> None:
    assert answer_confidence("B", [("B", -0.25)], "choice") == pytest.approx(-0.25)


def test_the_letter_is_found_from_the_end_not_inside_a_word() -> None:
    tokens = [("The", -0.1), (" answer", -0.2), (" is", 0.0), (" (", -0.01), ("B", -0.7),
              (")", -0.02), (" because", -0.3), (" bees", -0.4)]  # fmt: skip
    text = "".join(t for t, _ in tokens)
    # the window reaches back to "B": B, ), because, bees count; "b" of because does not
    assert answer_confidence(text, tokens, "choice") == pytest.approx(-0.7 - 0.02 - 0.3 - 0.4)


def test_a_number_is_matched_whole_after_dropping_commas_and_dollars() -> None:
    tokens = [("It", 0.0), (" costs", -0.1), (" $", -0.05), ("1", -0.5), (",", -0.01),
              ("218", -0.6), (".", -0.02)]  # fmt: skip
    text = "".join(t for t, _ in tokens)
    assert answer_confidence(text, tokens, "number") == pytest.approx(-0.5 - 0.01 - 0.6 - 0.02)
    assert answer_confidence("#### 18", [("####", 0.0), (" 118", -0.3)], "number") is None


def test_free_text_sums_every_token_and_missing_inputs_give_none() -> None:
    assert answer_confidence("Paris", [("Par", -0.1), ("is", -0.2)], "text") == pytest.approx(-0.3)
    assert answer_confidence("B", None, "choice") is None
    assert answer_confidence(None, [("B", -0.1)], "choice") is None
    assert answer_confidence("no letter here", [("no", -0.1)], "choice") is None
