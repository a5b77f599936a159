"""Trace loading: real files load whole (the shipped ones; as research tests, those of
../shared); every kind of bad line is named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.traces import TraceError, load_traces
from policies.answers import extract_choice
from tests.shipped import ALPACA_TRAIN, GSM8K_TRAIN, SHIPPED


def _row(i: int, models=("small", "big"), **override) -> dict:
    row = {
        "id": f"q{i}",
        "task": "mmlu",
        "messages": [{"role": "user", "content": f"question {i}? A) x B) y"}],
        "reference": "A",
        "models": {
            m: {
                "answer": "A",
                "correct": True,
                "confidence": -0.1,
                "cost_usd": 1e-5 * (k + 1),
                "latency_ms": 100.0,
                "tokens_in": 10,
                "tokens_out": 1,
            }
            for k, m in enumerate(models)
        },
    }
    row.update(override)
    return row


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_loads_with_all_rows(files: list[Path]) -> None:
    for path in files:
        n_lines = sum(1 for line in path.read_text().split("\n") if line.strip())
        traces = load_traces(path)
        assert len(traces) == n_lines, path
        assert traces.correct.shape == (n_lines, traces.n_models)
        assert len(set(traces.ids)) == n_lines


def test_every_shipped_trace_file_loads_with_all_rows() -> None:
    check_loads_with_all_rows(list(SHIPPED))


@pytest.mark.research_traces
def test_every_shared_trace_file_loads_with_all_rows(traces_dir: Path) -> None:
    files = sorted(traces_dir.glob("*.jsonl"))
    assert len(files) >= 10
    check_loads_with_all_rows(files)


def check_columns_hold_the_values_of_the_file(path: Path) -> None:
    first = json.loads(path.read_text().split("\n")[0])
    traces = load_traces(path)
    assert traces.models == tuple(first["models"])
    for j, m in enumerate(traces.models):
        entry = first["models"][m]
        assert traces.correct[0, j] == entry["correct"]
        assert traces.confidence[0, j] == pytest.approx(entry["confidence"])
        assert traces.cost_usd[0, j] == pytest.approx(entry["cost_usd"])
    assert traces.kind == "choice"
    assert traces.extracted[0] == [
        extract_choice(first["models"][m]["answer"]) for m in traces.models
    ]


def test_columns_hold_the_values_of_the_file(synthetic) -> None:
    check_columns_hold_the_values_of_the_file(synthetic[0])


@pytest.mark.research_traces
def test_columns_hold_the_values_of_a_real_file(traces_dir: Path) -> None:
    check_columns_hold_the_values_of_the_file(traces_dir / "mmlu-llama-train.jsonl")


def test_null_signals_become_nan() -> None:
    traces = load_traces(GSM8K_TRAIN)
    assert np.isnan(traces.confidence).all()
    assert np.isnan(traces.cost_usd).all()
    assert traces.kind == "number"


def test_subset_and_model_selection_keep_rows_aligned(synthetic) -> None:
    traces = load_traces(synthetic[0])
    sub = traces.subset(np.array([5, 2]))
    assert sub.ids == [traces.ids[5], traces.ids[2]]
    assert (sub.correct == traces.correct[[5, 2]]).all()
    two = traces.select_models(["large", "tiny"])
    assert two.models == ("large", "tiny")
    assert (two.correct[:, 0] == traces.correct[:, 4]).all()
    with pytest.raises(TraceError, match="unknown model"):
        traces.select_models(["gpt-9"])


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "q1", "messages": [', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({k: v for k, v in _row(1).items() if k != "messages"}), "'messages'"),
        (json.dumps({k: v for k, v in _row(1).items() if k != "id"}), "'id'"),
        (json.dumps(_row(1, models=("small",))), r"model\(s\) \['big'\] missing"),
        (json.dumps(_row(1, models=("small", "big", "huge"))), r"\['huge'\] not in"),
        (json.dumps(_row(0)), "duplicate id 'q0'"),
    ],
)
def test_bad_lines_are_reported_with_file_and_line(tmp_path: Path, bad_line, message) -> None:
    path = _write(tmp_path, [json.dumps(_row(0)), bad_line, json.dumps(_row(2))])
    with pytest.raises(TraceError, match=message) as err:
        load_traces(path)
    assert f"{path}:2:" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("correct", 1, "correct must be true or false"),
        ("confidence", "high", "confidence must be a finite number"),
        ("cost_usd", -1.0, "cost_usd must not be negative"),
        ("answer", 3, "answer must be a string"),
    ],
)
def test_wrong_types_in_a_model_entry_are_named(tmp_path: Path, field, value, message) -> None:
    row = _row(1)
    row["models"]["big"][field] = value
    path = _write(tmp_path, [json.dumps(_row(0)), json.dumps(row)])
    with pytest.raises(TraceError, match=message) as err:
        load_traces(path)
    assert f"{path}:2: models.big.{field}" in str(err.value)


def test_a_missing_model_field_is_named(tmp_path: Path) -> None:
    row = _row(0)
    del row["models"]["small"]["tokens_out"]
    path = _write(tmp_path, [json.dumps(row)])
    with pytest.raises(TraceError, match=r":1: models.small: missing field\(s\) \['tokens_out'\]"):
        load_traces(path)


def test_all_errors_are_listed_not_only_the_first(tmp_path: Path) -> None:
    path = _write(tmp_path, [json.dumps(_row(0)), "{", "nope", json.dumps(_row(3))])
    with pytest.raises(TraceError) as err:
        load_traces(path)
    text = str(err.value)
    assert "2 error(s)" in text
    assert f"{path}:2:" in text
    assert f"{path}:3:" in text


def test_empty_missing_and_blank_line_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TraceError, match="empty"):
        load_traces(empty)
    with pytest.raises(TraceError, match="no such trace file"):
        load_traces(tmp_path / "absent.jsonl")
    ok = _write(tmp_path, [json.dumps(_row(0)), "", json.dumps(_row(1))])
    assert len(load_traces(ok)) == 2


def test_a_line_separator_inside_a_string_is_not_a_line_break(tmp_path: Path) -> None:
    row = _row(0)
    row["models"]["small"]["answer"] = "A\u2028because"
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_traces(path).answers[0][0] == "A\u2028because"


@pytest.mark.parametrize(
    ("value", "shown"),
    [(1.5, "1.5"), (-0.01, "-0.01"), ("0.7", "'0.7'"), (True, "True"), ([0.5], r"\[0.5\]")],
)
def test_a_quality_outside_0_1_or_not_a_number_is_refused_with_file_and_line(
    tmp_path: Path, value, shown
) -> None:
    good = _row(0)
    good["models"]["big"]["quality"] = 0.25
    bad = _row(1)
    bad["models"]["big"]["quality"] = value
    path = _write(tmp_path, [json.dumps(good), json.dumps(bad)])
    with pytest.raises(TraceError, match=r"models.big.quality must be a number in \[0, 1\]") as err:
        load_traces(path)
    assert f"{path}:2: models.big.quality" in str(err.value)
    assert f"got {shown}".replace("\\", "") in str(err.value)


def test_graded_fields_are_read_and_kept_aligned() -> None:
    traces = load_traces(ALPACA_TRAIN)
    assert traces.quality is not None and traces.has_quality
    assert traces.subsets is not None and traces.subsets[0] == "helpful_base"
    # AlpacaEval's `correct` is the thresholded quality
    assert (traces.correct == (traces.quality >= 0.5)).all()
    graded = traces.with_label("quality")
    assert graded.label == "quality" and graded.correct.dtype == float
    assert np.allclose(graded.correct, traces.quality)
    sub = graded.subset(np.array([3, 1])).select_models([traces.models[2], traces.models[0]])
    assert np.allclose(sub.correct, traces.quality[np.ix_([3, 1], [2, 0])])
    assert np.allclose(sub.quality, sub.correct)
    assert sub.subsets == [traces.subsets[3], traces.subsets[1]]


def test_a_quality_label_needs_a_quality_for_every_answer(tmp_path: Path) -> None:
    ungraded = load_traces(GSM8K_TRAIN)
    assert ungraded.quality is None
    with pytest.raises(TraceError, match="no model records `quality`"):
        ungraded.with_label("quality")
    part = _row(0)
    part["models"]["big"]["quality"] = 0.9  # the small model's answer has none
    path = _write(tmp_path, [json.dumps(part), json.dumps(_row(1))])
    with pytest.raises(TraceError, match="3 answer"):
        load_traces(path).with_label("quality")
    with pytest.raises(TraceError, match="unknown label"):
        ungraded.with_label("stars")


SUMMARY = {"mean": -0.4, "min": -6.0, "q05": -3.1, "q25": -0.9}


def test_a_logprob_summary_is_read_as_an_n_m_4_column_nan_where_absent(tmp_path: Path) -> None:
    first, second = _row(0), _row(1)
    first["models"]["big"]["logprob_summary"] = SUMMARY
    second["models"]["big"]["logprob_summary"] = None
    path = _write(tmp_path, [json.dumps(first), json.dumps(second)])
    traces = load_traces(path)
    assert traces.logprob_summaries is not None
    assert traces.logprob_summaries.shape == (2, 2, 4)
    assert traces.logprob_summaries[0, 1].tolist() == [-0.4, -6.0, -3.1, -0.9]
    assert np.isnan(traces.logprob_summaries[1]).all()
    assert np.isnan(traces.logprob_summaries[0, 0]).all()
    # kept aligned through row and model selection
    sub = traces.subset(np.array([0])).select_models(["big", "small"])
    assert sub.logprob_summaries[0, 0].tolist() == [-0.4, -6.0, -3.1, -0.9]
    assert np.isnan(sub.logprob_summaries[0, 1]).all()
    # traces without any summary carry no column
    assert load_traces(ALPACA_TRAIN).logprob_summaries is None


@pytest.mark.parametrize(
    "value",
    [
        {"mean": -0.4, "min": -6.0, "q05": -3.1},  # a key missing
        {**SUMMARY, "max": 0.0},  # an unknown key
        {**SUMMARY, "q05": 0.5},  # a logprob above 0
        {**SUMMARY, "min": "-6"},  # not a number
        {**SUMMARY, "mean": True},
        [-0.4, -6.0, -3.1, -0.9],  # not an object
        -0.4,
    ],
)
def test_a_bad_logprob_summary_is_refused_with_file_and_line(tmp_path: Path, value) -> None:
    bad = _row(1)
    bad["models"]["small"]["logprob_summary"] = value
    path = _write(tmp_path, [json.dumps(_row(0)), json.dumps(bad)])
    with pytest.raises(TraceError, match=r"models.small.logprob_summary must be an object") as err:
        load_traces(path)
    assert f"{path}:2: models.small.logprob_summary" in str(err.value)


def test_a_non_finite_logprob_summary_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path, ['{"id": "q0", "messages": [{"role": "user", "content": "x"}], "models": '
                   '{"a": {"answer": "A", "correct": true, "confidence": null, "cost_usd": 1, '
                   '"latency_ms": 1, "tokens_in": 1, "tokens_out": 1, "logprob_summary": '
                   '{"mean": -1, "min": -Infinity, "q05": -2, "q25": -1}}}}']
    )  # fmt: skip
    with pytest.raises(TraceError, match=rf"{path}:1: models.a.logprob_summary"):
        load_traces(path)
