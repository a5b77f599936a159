"""Graders: is a model's answer right? They turn live outputs into the `correct` labels of traces.

`collect` needs a label for every (item, model) before a policy can be fitted, and users bring
their own tasks, so the grader is chosen on the command line (`--grader`):

    mc              multiple-choice letter ("The answer is (B)." is right for reference "B")
    numeric         final number of a chain of thought, GSM8K style ("#### 1,234" == "1234.0")
    exact           normalised exact match (case, punctuation, articles, whitespace)
    regex:PATTERN   the last match of PATTERN (its first group if it has one) against the
                    reference, compared as numbers when both are numbers, else normalised text
    judge:MODEL     a configured model asked whether the answer is right; costs money, so each
                    grade returns its cost for `collect` to log and count against the budget

Extraction reuses `policies.answers`, the code the proxy uses at serve time, so a label means
the same thing in calibration as in serving.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from policies.answers import extract_answer, extract_choice, extract_number, normalise_text
from policies.errors import InvalidInput
from policies.judging import JUDGE_PARAMS, judge_messages, parse_verdict

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
    ) -> Grade:
        """Grade one output; async so a judge can call a model (the others never wait)."""
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
    """Ask a configured model whether the answer is right (with the reference when known)."""

    needs_reference = False
    paid = True

    def __init__(self, model: str, backend: Backend, params: Mapping[str, Any] | None = None):
        self.model = model
        self.backend = backend
        self.params = dict(JUDGE_PARAMS if params is None else params)
        self.spec = f"judge:{model}"

    def __call__(self, text: str | None, reference: str | None) -> bool:
        raise TypeError("the judge grader calls a model: use `await grader.grade(...)`")

    def prompt(self, text: str, reference: str | None, messages: list[dict] | None) -> list[dict]:
        from upstreams.common import last_user_text

        return judge_messages(last_user_text(messages or []), text, reference)

    async def grade(
        self,
        text: str | None,
        reference: str | None,
        messages: list[dict] | None = None,
        kind: str | None = None,
    ) -> Grade:
        answer = self.extract(text, kind)
        if text is None or not text.strip():
            return Grade(answer, False)  # nothing to judge, nothing spent
        result = await self.backend.complete(self.prompt(text, reference, messages), self.params)
        if not result.ok:
            return Grade(answer, False, result.cost_usd, f"judge {self.model}: {result.error}")
        verdict = parse_verdict(result.text)
        if verdict is None:
            error = f"judge {self.model}: no yes/no verdict in {result.text[:60]!r}"
            return Grade(answer, False, result.cost_usd, error)
        return Grade(answer, verdict, result.cost_usd)

    async def aclose(self) -> None:
        await self.backend.aclose()


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
