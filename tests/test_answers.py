"""Answer extraction and agreement, on hand-written cases and on real rows of the traces: the
GSM8K traces shipped in proxy/demo and, as research tests, the MMLU, MedMCQA and RouterBench
ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.answers import (
    answers_agree,
    detect_kind,
    extract_answer,
    extract_choice,
    extract_number,
    has_final_marker,
    normalise_text,
)
from proxy import demo


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("C\n", "C"),
        ("(D)", "D"),
        ("A) dry palms", "A"),
        ("The answer is (B).", "B"),
        ("Answer: c", "C"),
        ("I think the correct option is D because ...", "D"),
        ("**A**", "A"),
        ("Okay,", None),
        ("I do", None),
        ("", None),
        (None, None),
    ],
)
def test_choice_letters_are_found_alone_and_inside_sentences(text, letter) -> None:
    assert extract_choice(text) == letter


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She pays 6 * 3 = <<6*3=18>>18 dollars.\n#### 18", "18"),
        ("The total is $18.", "18"),
        ("He needs 18 bolts", "18"),
        ("so 1,234 people came.\n#### 1,234", "1234"),
        ("It costs $12.50 in all", "12.5"),
        ("The answer is 7.0", "7"),
        ("x = 3 then 4 + 5 = 9\n\nThe answer is: -2", "-2"),
        ("\\boxed{42}", "42"),
        ("first 3 then 5 then 8", "8"),
        ("no digits here", None),
    ],
)
def test_numbers_come_from_the_final_answer_of_a_chain_of_thought(text, number) -> None:
    assert extract_number(text) == number


def test_final_marker_detects_truncated_chains_of_thought() -> None:
    assert has_final_marker("so 3 + 4 = 7\n#### 7")
    assert not has_final_marker("Toula bought 3 x 12 = <<3*12=36>>36 donuts at $68/dozen, which")


def test_short_text_is_normalised_before_comparison() -> None:
    assert normalise_text("The Noo-Noo.") == "noonoo"
    assert normalise_text("  a   Tinky Winky ") == "tinky winky"
    assert (
        answers_agree(extract_answer("Noo-Noo", "text"), extract_answer("noo noo", "text")) is False
    )
    assert answers_agree(extract_answer("The Beatles", "text"), extract_answer("beatles!", "text"))
    assert not answers_agree(None, None)
    assert answers_agree(extract_answer("#### 18", "number"), extract_answer("$18.", "number"))


def test_kind_detection_uses_task_then_data() -> None:
    assert detect_kind("mmlu", [], []) == "choice"
    assert detect_kind("gsm8k", [], []) == "number"
    assert detect_kind(None, ["A", "C"], []) == "choice"
    assert detect_kind(None, ["12", "3.5"], []) == "number"
    assert detect_kind(None, [None], ["B", "C\n", "A"]) == "choice"
    assert detect_kind("triviaqa", [None], ["Paris", "Noo-Noo"]) == "text"
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("x", "haiku")


def _rows(path: Path, limit: int) -> list[dict]:
    with path.open() as fh:
        return [json.loads(line) for _, line in zip(range(limit), fh, strict=False)]


@pytest.mark.research_traces
@pytest.mark.parametrize("name", ["mmlu-llama-train", "medmcqa-qwen_oai-train"])
def test_real_multiple_choice_rows_extract_to_the_graded_letter(traces_dir: Path, name) -> None:
    checked = 0
    for row in _rows(traces_dir / f"{name}.jsonl", 300):
        for entry in row["models"].values():
            letter = extract_choice(entry["answer"])
            assert (letter == row["reference"]) == entry["correct"], (row["id"], entry)
            checked += 1
    assert checked > 1000


def test_real_gsm8k_chains_of_thought_extract_to_the_reference() -> None:
    rows = _rows(demo.TRAIN, 400)  # the shipped RouteLLM traces
    agree = total = 0
    for row in rows:
        for entry in row["models"].values():
            total += 1
            agree += (extract_number(entry["answer"]) == row["reference"]) == entry["correct"]
    assert agree / total > 0.98, agree / total


@pytest.mark.research_traces
def test_real_arc_answers_of_correct_models_agree_with_each_other(traces_dir: Path) -> None:
    rows = _rows(traces_dir / "arc_challenge-routerbench-train.jsonl", 400)
    for row in rows:
        right = {extract_choice(e["answer"]) for e in row["models"].values() if e["correct"]}
        wrong = {extract_choice(e["answer"]) for e in row["models"].values() if not e["correct"]}
        assert len(right) <= 1, row["id"]
        assert not (right & wrong), row["id"]
