"""Graders: is a model's answer right? They turn live outputs into the `correct` labels of traces.

`collect` needs a label for every (item, model) before a policy can be fitted, and users bring
their own tasks, so the grader is chosen on the command line (`--grader`):

    mc              multiple-choice letter ("The answer is (B)." is right for reference "B")
    numeric         final number of a chain of thought, GSM8K style ("#### 1,234" == "1234.0")
    exact           normalised exact match (case, punctuation, articles, whitespace)
    regex:PATTERN   the last match of PATTERN (its first group if it has one) against the
                    reference, compared as numbers when both are numbers, else normalised text
    judge:MODEL     a configured model grades the answer (graded: `quality` in [0, 1], and
                    correct = quality >= 0.5): its probability that the answer beats the
                    reference model's answer to the same prompt, read from its logprobs
                    (pairwise, asked in both orders and averaged, so a taste for the
                    first or the second position cancels out), or, from a judge that
                    returns no logprobs or with no reference model's answer to compare,
                    its 1-10 rubric score scaled to [0, 1]; costs money, so each grade
                    returns its cost for `collect` to log and count against the budget

Extraction reuses `policies.answers`, the code the proxy uses at serve time, so a label means
the same thing in calibration as in serving.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from policies.answers import extract_answer, extract_choice, extract_number, normalise_text
from policies.errors import InvalidInput
from policies.judging import (
    JUDGE_PARAMS,
    debiased_quality,
    pairwise_messages,
    pairwise_quality,
    parse_choice,
    parse_rubric,
    rubric_messages,
)

if TYPE_CHECKING:
    from upstreams.base import Backend

GRADER_SPECS = ("mc", "numeric", "exact", "regex:PATTERN", "judge:MODEL")
DEFAULT_FOR_KIND = {"choice": "mc", "number": "numeric", "text": "exact"}


class GraderError(InvalidInput):
    """A grader spec that does not parse (unknown name, bad regex, unknown judge model)."""


@dataclass(frozen=True)
class Grade:
    """One graded answer. `error` set means no verdict could be had (the judge failed)."""

    answer: str | None  # the extracted answer, as written to the trace
    correct: bool
    cost_usd: float | None = None  # what grading cost (the judge's call); None: free/unknown
    error: str | None = None
    quality: float | None = None  # a graded label in [0, 1] (the judge's); None: boolean only


def _exact_form(text: str | None) -> str | None:
    """Normalised text; a reference that is only an article ("A") keeps its lower-case form."""
    if text is None:
        return None
    return normalise_text(text) or (text.strip().lower() or None)


class Grader:
    """Deterministic graders: extract an answer, compare it with the extracted reference."""

    spec: str = ""
    kind: str | None = None  # the answer kind this grader implies (None: from the data)
    needs_reference: bool = True
    paid: bool = False  # grading calls a model: its cost is logged per answer
    pairwise: bool = False  # grades against the reference model's answer (`versus`)

    def extract(self, text: str | None, kind: str | None = None) -> str | None:
        """The answer to record; `kind` is used only by graders that imply none."""
        return extract_answer(text, self.kind or kind or "text")

    def reference_form(self, reference: str | None) -> str | None:
        return self.extract(reference)

    def __call__(self, text: str | None, reference: str | None) -> bool:
        """True when `text` answers `reference` (both raw strings)."""
        answer = self.extract(text)
        return answer is not None and answer == self.reference_form(reference)

    async def grade(
        self,
        text: str | None,
        reference: str | None,
        messages: list[dict] | None = None,
        kind: str | None = None,
        versus: str | None = None,
    ) -> Grade:
        """Grade one output; async so a judge can call a model (the others never wait).
        `versus` is the reference model's answer to the same prompt (pairwise graders)."""
        return Grade(self.extract(text, kind), self(text, reference))

    async def aclose(self) -> None:
        """Release what grading holds (the judge's HTTP session)."""


class ChoiceGrader(Grader):
    spec = "mc"
    kind = "choice"

    def extract(self, text: str | None, kind: str | None = None) -> str | None:
        return extract_choice(text)


class NumericGrader(Grader):
    spec = "numeric"
    kind = "number"

    def extract(self, text: str | None, kind: str | None = None) -> str | None:
        return extract_number(text)


class ExactGrader(Grader):
    spec = "exact"
    kind = "text"

    def extract(self, text: str | None, kind: str | None = None) -> str | None:
        return _exact_form(text)


class RegexGrader(Grader):
    """User-defined extraction: the last match wins, as a chain of thought answers last."""

    def __init__(self, pattern: str) -> None:
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise GraderError(
                f"grader regex:{pattern}: not a valid regular expression: {exc}"
            ) from None
        self.spec = f"regex:{pattern}"

    def extract(self, text: str | None, kind: str | None = None) -> str | None:
        if not text:
            return None
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        found = last.group(1) if self.pattern.groups else last.group(0)
        return found.strip() if found is not None else None

    def reference_form(self, reference: str | None) -> str | None:
        return None if reference is None else reference.strip()

    def __call__(self, text: str | None, reference: str | None) -> bool:
        answer, ref = self.extract(text), self.reference_form(reference)
        if answer is None or ref is None:
            return False
        a_num, r_num = extract_number(answer), extract_number(ref)
        if a_num is not None and r_num is not None and _is_number(answer) and _is_number(ref):
            return a_num == r_num
        return _exact_form(answer) == _exact_form(ref)


_NUMBER_ONLY = re.compile(r"^\s*-?\$?\s?[\d,]*\.?\d+\s*$")


def _is_number(text: str) -> bool:
    return bool(_NUMBER_ONLY.match(text))


class JudgeGrader(Grader):
    """A configured model grades the answer: `quality` is its probability that the answer
    beats the reference model's (`versus`), from the logprob of its A/B reply, asked twice at
    once (the answer as A, then as B) and averaged, since judges favour a position; from a
    judge without logprobs, or with nothing to compare, its 1-10 rubric score scaled to
    [0, 1]. A judge seen to return no logprobs is asked only for rubric scores from then on.

    Both orders or none: when either call fails, gives no A/B verdict, or only one carries
    logprobs, the grade is an error (both calls' cost counted), so `collect` leaves the item
    unwritten and a rerun asks again; one order alone would bring the bias back."""

    needs_reference = False
    paid = True
    pairwise = True

    def __init__(self, model: str, backend: Backend, params: Mapping[str, Any] | None = None):
        self.model = model
        self.backend = backend
        self.params = dict(JUDGE_PARAMS if params is None else params)
        self.spec = f"judge:{model}"
        self.gives_logprobs: bool | None = None  # unknown until the first pairwise reply

    def __call__(self, text: str | None, reference: str | None) -> bool:
        raise TypeError("the judge grader calls a model: use `await grader.grade(...)`")

    def prompt(
        self,
        text: str,
        reference: str | None,
        messages: list[dict] | None,
        versus: str | None = None,
        swapped: bool = False,
    ) -> list[dict]:
        """The pairwise prompt when there is a `versus` answer (`text` as response A, or as
        B when `swapped`), else the rubric prompt."""
        from upstreams.common import last_user_text

        question = last_user_text(messages or [])
        if versus is not None:
            if swapped:
                return pairwise_messages(question, versus, text)
            return pairwise_messages(question, text, versus)
        return rubric_messages(question, text, reference)

    async def grade(
        self,
        text: str | None,
        reference: str | None,
        messages: list[dict] | None = None,
        kind: str | None = None,
        versus: str | None = None,
    ) -> Grade:
        answer = self.extract(text, kind)
        if text is None or not text.strip():
            return Grade(answer, False, quality=0.0)  # nothing to judge, nothing spent
        spent = 0.0
        if versus is not None and self.gives_logprobs is not False:
            first, swapped = await asyncio.gather(
                self._ask_pairwise(self.prompt(text, None, messages, versus)),
                self._ask_pairwise(self.prompt(text, None, messages, versus, swapped=True)),
            )
            cost = _total_cost(first.cost_usd, swapped.cost_usd)
            error = first.error or swapped.error
            if error is None and (first.p_a is None) != (swapped.p_a is None):
                error = f"judge {self.model}: logprobs in only one of the two orders"
            if error is not None:
                return Grade(answer, False, cost, error)
            if first.p_a is not None and swapped.p_a is not None:
                self.gives_logprobs = True
                q = debiased_quality(first.p_a, swapped.p_a)
                return Grade(answer, q >= 0.5, cost, quality=q)
            self.gives_logprobs = False
            spent = cost or 0.0
        result = await self.backend.complete(self.prompt(text, reference, messages), self.params)
        cost = None if result.cost_usd is None and not spent else spent + (result.cost_usd or 0.0)
        if not result.ok:
            return Grade(answer, False, cost, f"judge {self.model}: {result.error}")
        q = parse_rubric(result.text)
        if q is None:
            error = f"judge {self.model}: no 1-10 score in {result.text[:60]!r}"
            return Grade(answer, False, cost, error)
        return Grade(answer, q >= 0.5, cost, quality=q)

    async def _ask_pairwise(self, prompt: list[dict]) -> _PairwiseVerdict:
        """One A/B call, read into P(A is better) (None: the reply had no logprobs)."""
        result = await self.backend.complete(prompt, self.params)
        if not result.ok:
            return _PairwiseVerdict(None, result.cost_usd, f"judge {self.model}: {result.error}")
        choice = parse_choice(result.text)
        if choice is None:
            error = f"judge {self.model}: no A/B verdict in {result.text[:60]!r}"
            return _PairwiseVerdict(None, result.cost_usd, error)
        if not result.token_logprobs:
            return _PairwiseVerdict(None, result.cost_usd)
        return _PairwiseVerdict(_letter_quality(choice, result.token_logprobs), result.cost_usd)

    async def aclose(self) -> None:
        await self.backend.aclose()


@dataclass(frozen=True)
class _PairwiseVerdict:
    """What one order of the pairwise question gave."""

    p_a: float | None  # P(response A is better); None without logprobs or on an error
    cost_usd: float | None
    error: str | None = None


def _total_cost(*costs: float | None) -> float | None:
    """The sum of the known costs; None when none is known (an unpriced judge)."""
    known = [c for c in costs if c is not None]
    return sum(known) if known else None


def _letter_quality(choice: str, logprobs: list[tuple[str, float]]) -> float:
    """P(A is better) from the logprob of the reply's first letter token (past markdown or
    quotes); 1 or 0 when no token is the letter alone (a tokenizer that merged it)."""
    for token, logprob in logprobs:
        if token.strip(" *\"'(:.\n").upper() == choice:
            return pairwise_quality(choice, logprob)
    return 1.0 if choice == "A" else 0.0


_SIMPLE: dict[str, type[Grader]] = {
    "mc": ChoiceGrader,
    "numeric": NumericGrader,
    "exact": ExactGrader,
}


def parse_grader(spec: str, models: Mapping[str, Any] | None = None) -> Grader:
    """The grader a `--grader` spec names; `models` (the config's: name -> ModelConfig) is
    needed for judge:MODEL.

    Raises GraderError with the list of valid specs for anything else.
    """
    name, sep, arg = spec.strip().partition(":")
    name = name.lower()
    if name in _SIMPLE and not sep:
        return _SIMPLE[name]()
    if name == "regex" and arg:
        return RegexGrader(arg)
    if name == "judge" and arg:
        if models is None or arg not in models:
            have = ", ".join(sorted(models or ())) or "none"
            raise GraderError(
                f"grader {spec!r}: model {arg!r} is not in the configuration (models: {have})"
            )
        from upstreams.factory import make_backend

        return JudgeGrader(arg, make_backend(arg, models[arg]))
    raise GraderError(f"unknown grader {spec!r}; expected one of: {', '.join(GRADER_SPECS)}")


def default_grader(kind: str) -> Grader:
    """The grader for an answer kind (choice -> mc, number -> numeric, text -> exact)."""
    return parse_grader(DEFAULT_FOR_KIND[kind])
