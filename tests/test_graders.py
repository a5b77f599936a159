"""Graders against the labels of real recorded traces (the GSM8K traces shipped in proxy/demo;
as research tests, ../shared/data/traces), and the LLM judge against the fake upstream over
real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from calibration.graders import (
    GRADER_SPECS,
    ChoiceGrader,
    ExactGrader,
    GraderError,
    JudgeGrader,
    NumericGrader,
    RegexGrader,
    parse_grader,
)
from policies.judging import parse_choice, parse_rubric, parse_verdict
from proxy import demo
from tests.fake_upstream import FakeUpstream, build_app, serve
from upstreams.settings import ModelConfig

GSM8K_FINAL = r"regex:####\s*\$?(-?[\d,]*\.?\d+)"
research = pytest.mark.research_traces


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def agreement(path: Path, spec: str) -> tuple[float, int]:
    """Share of (row, model) whose grade equals the source's recorded `correct`."""
    grader = parse_grader(spec)
    pairs = [
        (grader(e["answer"], r["reference"]), e["correct"])
        for r in rows(path)
        for e in r["models"].values()
    ]
    return sum(g == c for g, c in pairs) / len(pairs), len(pairs)


def check_agreement(path: Path, spec: str, at_least: float) -> None:
    rate, n = agreement(path, spec)
    print(f"{path.stem} {spec}: agreement {rate:.4f} on {n} answers")
    assert n >= 800
    assert rate >= at_least


def test_the_numeric_grader_agrees_with_the_shipped_gsm8k_labels() -> None:
    # RouteLLM's own grader calls "#### $57.00" wrong for 57 (see the test below);
    # measured: 0.9825. A constant grader would not pass: a quarter of the answers are wrong.
    labels = [e["correct"] for r in rows(demo.TRAIN) for e in r["models"].values()]
    assert 0.3 < sum(labels) / len(labels) < 0.8
    check_agreement(demo.TRAIN, "numeric", 0.975)


# measured on this data: 1.0, 1.0, 0.9993, 1.0, 1.0, 0.998, 0.9947
@pytest.mark.parametrize(
    ("name", "spec", "at_least"),
    [
        pytest.param("mmlu-llama-train", "mc", 0.999, marks=research),
        pytest.param("mmlu-qwen_oai-train", "mc", 0.999, marks=research),
        pytest.param("medmcqa-llama-train", "mc", 0.999, marks=research),
        pytest.param("mmlu-llama-train", "exact", 0.999, marks=research),  # bare letters
        pytest.param("mmlu-llama-train", r"regex:^\s*([A-D])\b", 0.999, marks=research),
        pytest.param("gsm8k-llama-train", "numeric", 0.995, marks=research),
        pytest.param("gsm8k-llama-train", GSM8K_FINAL, 0.99, marks=research),
    ],
)
def test_graders_agree_with_the_recorded_labels(traces_dir: Path, name, spec, at_least) -> None:
    check_agreement(traces_dir / f"{name}.jsonl", spec, at_least)


def test_the_numeric_disagreements_are_formatting_the_source_grader_rejects() -> None:
    grader = NumericGrader()
    disagree = [
        (e["answer"], r["reference"], e["correct"])
        for r in rows(demo.TRAIN)
        for e in r["models"].values()
        if grader(e["answer"], r["reference"]) != e["correct"]
    ]
    # mostly right answers written with cents ("$57.00") that the source marked wrong
    cents = [a for a, _, c in disagree if not c and ".00" in a[-40:]]
    assert len(cents) >= len(disagree) // 2
    assert grader("so the total is $53.00 + $4.00 = $57.00.\n\n#### $57.00", "57")


@research
def test_a_constant_grader_would_not_pass(traces_dir: Path) -> None:
    """The agreement bar is meaningful: half the answers on MMLU are wrong."""
    labels = [e["correct"] for r in rows(traces_dir / "mmlu-llama-train.jsonl")
              for e in r["models"].values()]  # fmt: skip
    assert 0.3 < sum(labels) / len(labels) < 0.8


@research
def test_exact_match_is_precise_on_free_text(traces_dir: Path) -> None:
    """TriviaQA has no reference; an answer judged right in the same row stands in for it.
    Exact matches of it must be judged right too (measured: 653 of 653)."""
    grader = ExactGrader()
    matched = right = 0
    for r in rows(traces_dir / "triviaqa-llama-train.jsonl"):
        entries = list(r["models"].values())
        accepted = [e["answer"] for e in entries if e["correct"]]
        if not accepted:
            continue
        for e in entries[:-1]:
            if grader(e["answer"], accepted[-1]):
                matched += 1
                right += e["correct"]
    print(f"triviaqa exact: {right}/{matched} matches judged right")
    assert matched >= 500
    assert right / matched >= 0.995


def test_each_grader_extracts_what_a_person_would() -> None:
    mc, num, exact = ChoiceGrader(), NumericGrader(), ExactGrader()
    assert mc("The answer is (B).", "B") and not mc("The answer is (C).", "B")
    assert not mc("I cannot tell", "B") and mc.extract("I cannot tell") is None
    assert num("48 + 24 = 72\n#### 72", "72") and num("total: $1,234.50", "1234.5")
    assert num("#### 18.0", "18") and not num("#### 17", "18")
    assert exact("The Eiffel Tower!", "eiffel tower") and not exact("Louvre", "eiffel tower")
    assert exact("A", "a") and not exact("B", "A")
    regex = RegexGrader(r"Final: (\w+)")
    assert regex.extract("Final: Paris ... Final: Lyon") == "Lyon"  # the last match
    assert regex("Final: lyon", "Lyon") and not regex("no marker", "Lyon")
    assert RegexGrader(r"[\d.]+")("there are 3 then 72.0", "72")  # whole match, as numbers


def test_specs_parse_and_bad_ones_say_what_is_valid() -> None:
    assert isinstance(parse_grader("mc"), ChoiceGrader)
    assert isinstance(parse_grader(" Numeric "), NumericGrader)
    assert parse_grader("regex:a:(b)").pattern.pattern == "a:(b)"
    for bad in ("mcq", "regex:", "judge", "mc:x", ""):
        with pytest.raises(GraderError) as err:
            parse_grader(bad)
        assert all(s in str(err.value) for s in GRADER_SPECS)
    with pytest.raises(GraderError, match="not a valid regular expression"):
        parse_grader("regex:(")
    with pytest.raises(GraderError, match=r"'big' is not in the configuration \(models: small\)"):
        parse_grader("judge:big", {"small": ModelConfig(backend="openai", base_url="http://x")})


def test_verdicts() -> None:
    assert parse_verdict("Yes.") is True and parse_verdict("no") is False
    assert parse_verdict("Correct") is True and parse_verdict("**Incorrect**") is False
    assert parse_verdict("The candidate is right, so: yes") is True
    assert parse_verdict("I would say no, or rather yes") is None and parse_verdict("maybe") is None


# ------------------------------------------------------------------------------- the judge

PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens
QUESTION = [{"role": "user", "content": "How many legs does a spider have?"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Judges:
    state: FakeUpstream
    models: dict[str, ModelConfig]

    def calls(self, model: str) -> int:
        return self.state.stats[model].calls


LOGPROB_A, LOGPROB_B = -0.25, -0.1  # a judge's logprob of its one-letter verdict


@pytest.fixture
async def judges() -> AsyncIterator[Judges]:
    app = build_app(
        answers={
            "judge-a": ("A", LOGPROB_A),
            "judge-vague": "Perhaps",
            "judge-plain": "A",  # configured without logprobs: graded by its rubric score
        }
    )
    async with serve(app) as up:
        cfg = ModelConfig(
            backend="openai",
            base_url=f"{up.url}/v1",
            price_in_per_mtok=PRICE_IN,
            price_out_per_mtok=PRICE_OUT,
            max_retries=0,
        )
        models = {m: cfg for m in up.state.models}
        models["judge-plain"] = cfg.model_copy(update={"logprobs": False})
        yield Judges(up.state, models)


def expected_cost(
    grader: JudgeGrader,
    text: str,
    reference: str | None,
    words_out: int,
    versus: str | None,
    swapped: bool = False,
) -> float:
    """The fake counts prompt tokens as words; its answer's tokens are its words."""
    prompt = grader.prompt(text, reference, QUESTION, versus, swapped)
    words_in = sum(len(m["content"].split()) for m in prompt)
    return (words_in * PRICE_IN + words_out * PRICE_OUT) / 1e6


def pairwise_cost(grader: JudgeGrader, text: str, versus: str) -> float:
    """Both orders of the pairwise question, each answered with one letter."""
    return expected_cost(grader, text, None, 1, versus) + expected_cost(
        grader, text, None, 1, versus, swapped=True
    )


def user_prompt(grader: JudgeGrader, text: str, versus: str, swapped: bool) -> str:
    """The judge's user message (what the fake upstream keys per-prompt answers on)."""
    return grader.prompt(text, None, QUESTION, versus, swapped)[-1]["content"]


def sent(judges: Judges, model: str) -> str:
    return judges.state.stats[model].last_request["messages"][-1]["content"]


def test_graded_verdicts() -> None:
    assert parse_choice("A") == "A" and parse_choice("**Response B** is better") == "B"
    assert parse_choice("Both are fine") is None and parse_choice(None) is None
    assert parse_rubric("10") == 1.0 and parse_rubric("1/10") == 0.0
    assert parse_rubric("7.") == pytest.approx(6 / 9) and parse_rubric("eleven") is None


@pytest.mark.anyio
async def test_the_judge_grades_pairwise_in_both_orders_from_its_logprobs(
    judges: Judges,
) -> None:
    """quality = P(the answer beats the reference model's), from the verdict's logprob,
    averaged over the answer shown first and shown second."""
    a = parse_grader("judge:judge-a", judges.models)
    assert isinstance(a, JudgeGrader) and a.pairwise
    eight, six = "Eight legs.", "Six legs."
    # a judge that prefers "Eight legs." wherever it stands, more surely when it is first
    first = user_prompt(a, eight, six, swapped=False)
    second = user_prompt(a, eight, six, swapped=True)
    judges.state.set_answer("judge-a", "A", LOGPROB_A, prompt=first)
    judges.state.set_answer("judge-a", "B", LOGPROB_B, prompt=second)
    assert "Response A:\nEight legs." in first and "Response B:\nSix legs." in first
    assert "Response A:\nSix legs." in second and "Response B:\nEight legs." in second
    both = (math.exp(LOGPROB_A) + math.exp(LOGPROB_B)) / 2
    try:
        better = await a.grade(eight, None, QUESTION, versus=six)
        assert better.quality == pytest.approx(both) and better.correct is True
        assert better.error is None
        assert better.cost_usd == pytest.approx(pairwise_cost(a, eight, six))
        assert judges.calls("judge-a") == 2
        # the same two prompts read from the other side: the complement
        worse = await a.grade(six, None, QUESTION, versus=eight)
        assert worse.quality == pytest.approx(1 - both) and worse.correct is False
        assert "spider" in sent(judges, "judge-a")
        empty = await a.grade("", None, QUESTION, versus="Eight.")  # nothing to judge: no call
        assert empty.quality == 0.0 and empty.correct is False and empty.cost_usd is None
        assert judges.calls("judge-a") == 4
    finally:
        await a.aclose()


@pytest.mark.anyio
async def test_a_judge_that_favours_a_position_scores_equal_answers_a_tie(
    judges: Judges,
) -> None:
    """A judge that always says A, with P = 0.8: asked once it would give 0.8 to whatever
    is shown first; asked in both orders its taste cancels out."""
    judges.state.set_answer("judge-a", "A", math.log(0.8))
    a = parse_grader("judge:judge-a", judges.models)
    assert isinstance(a, JudgeGrader)
    try:
        same = await a.grade("Eight legs.", None, QUESTION, versus="Eight legs.")
        assert same.quality == pytest.approx(0.5) and same.error is None
        assert same.cost_usd == pytest.approx(pairwise_cost(a, "Eight legs.", "Eight legs."))
        other = await a.grade("Six legs.", None, QUESTION, versus="Eight legs.")
        assert other.quality == pytest.approx(0.5)
        assert other.cost_usd == pytest.approx(pairwise_cost(a, "Six legs.", "Eight legs."))
        assert judges.calls("judge-a") == 4  # two calls per grade
    finally:
        await a.aclose()


@pytest.mark.anyio
async def test_a_judge_that_answers_only_one_order_leaves_the_answer_ungraded(
    judges: Judges,
) -> None:
    """One order alone would bring the position bias back: no quality, an error (collect
    leaves the item for a rerun), and both calls' cost counted."""
    a = parse_grader("judge:judge-a", judges.models)
    assert isinstance(a, JudgeGrader)
    swapped = user_prompt(a, "Eight legs.", "Six legs.", swapped=True)
    judges.state.set_answer("judge-a", "Perhaps", None, prompt=swapped)
    try:
        half = await a.grade("Eight legs.", None, QUESTION, versus="Six legs.")
        assert half.quality is None and half.correct is False
        assert half.error is not None and "no A/B verdict in 'Perhaps'" in half.error
        both = expected_cost(a, "Eight legs.", None, 1, "Six legs.") + expected_cost(
            a, "Eight legs.", None, 1, "Six legs.", swapped=True
        )
        assert half.cost_usd == pytest.approx(both)
        assert judges.calls("judge-a") == 2
    finally:
        await a.aclose()


@pytest.mark.anyio
async def test_a_judge_without_logprobs_or_a_comparison_gives_a_rubric_score(
    judges: Judges,
) -> None:
    plain = parse_grader("judge:judge-plain", judges.models)
    assert isinstance(plain, JudgeGrader)
    rubric = plain.prompt("Eight legs.", "8", QUESTION)[-1]["content"]
    judges.state.set_answer("judge-plain", "8", None, prompt=rubric)
    try:
        # the pairwise replies have no logprobs: the judge is asked for a 1-10 score instead
        first = await plain.grade("Eight legs.", "8", QUESTION, versus="Six legs.")
        assert first.quality == pytest.approx(7 / 9) and first.correct is True
        assert "Reference answer:\n8" in sent(judges, "judge-plain")
        assert "from 1 to 10" in sent(judges, "judge-plain")
        spent = pairwise_cost(plain, "Eight legs.", "Six legs.") + expected_cost(
            plain, "Eight legs.", "8", 1, None
        )
        assert first.cost_usd == pytest.approx(spent)  # the wasted pairwise calls are counted
        assert judges.calls("judge-plain") == 3
        again = await plain.grade("Eight legs.", "8", QUESTION, versus="Six legs.")
        assert again.quality == pytest.approx(7 / 9)
        assert judges.calls("judge-plain") == 4  # known now: straight to the rubric
        unscored = await plain.grade("Six legs.", None, QUESTION)  # replies "A": no score
        assert unscored.error and "no 1-10 score" in unscored.error
    finally:
        await plain.aclose()


@pytest.mark.anyio
async def test_a_vague_or_failed_judge_is_an_error(judges: Judges) -> None:
    a = parse_grader("judge:judge-a", judges.models)
    vague = parse_grader("judge:judge-vague", judges.models)
    try:
        unclear = await vague.grade("Eight.", None, QUESTION, versus="Six.")
        assert unclear.correct is False and "no A/B verdict" in unclear.error
        judges.state.set_faults({"model": "judge-a", "error_rate": 1, "error_status": 500})
        failed = await a.grade("Six legs.", None, QUESTION, versus="Eight.")
        assert failed.error == "judge judge-a: http_500" and failed.correct is False
        assert failed.quality is None
    finally:
        await a.aclose()
        await vague.aclose()
