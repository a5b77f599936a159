"""Sampled nodes (`model@k`): the vote rule on real answers, trace samples, sampled columns and
their cost, the planted self-consistency relation recovered by the fit, node selection that
keeps a sampled node exactly when it pays, and bad input refused with nothing written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibration.fit import FittedIndex, select_nodes
from calibration.pricing import fill_costs
from calibration.sampling import add_sampled, parse_samples
from calibration.traces import TraceError, load_traces
from policies.answers import extract_answer, normalise_text
from policies.freetext import agreement
from policies.sampling import (
    SamplingError,
    exact_agreement,
    majority,
    medoid,
    parse_sampled,
    sampled_name,
    share_confidence,
    vote,
)
from tests.shipped import ALPACA_TEST, GSM8K_TEST
from tests.synthetic import PRICES, write_choice_traces
from upstreams.pricing import count_tokens

CASCADE = Path(sys.executable).parent / "cascade"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CASCADE_NO_PROGRESS": "1"}
    return subprocess.run(
        [str(CASCADE), *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> dict[str, Path]:
    """Train and test traces of small and large with 4 samples each: the self-consistency
    world (`independent`) and the uninformative one (`copies`)."""
    folder = tmp_path_factory.mktemp("sampled")
    out = {}
    for mode in ("independent", "copies"):
        for half, seed, rows in (("train", 1, 1500), ("test", 2, 3000)):
            out[f"{mode}-{half}"] = write_choice_traces(
                folder / f"{mode}-{half}.jsonl",
                models=["small", "large"],
                n_rows=rows,
                seed=seed,
                prefix=half[:2],
                samples=4,
                mode=mode,
            )
    return out


# ------------------------------------------------------------------ the vote rule


def test_majority_ties_go_to_the_earliest_and_no_answer_votes_for_nothing() -> None:
    v = majority(["B", None, "A", "A", "B"])
    assert v is not None and (v.index, v.votes, v.k) == (0, 2, 5)  # B and A tie: B came first
    assert v.share == pytest.approx(0.4) and v.confidence == pytest.approx(math.log(2.5 / 6))
    assert v.agreement == pytest.approx(2 / 6)  # 4 answered: 6 pairs, 2 agree
    assert majority([None, None]) is None
    unanimous = majority(["7"] * 5)
    assert unanimous is not None and unanimous.share == 1.0
    assert unanimous.confidence == pytest.approx(math.log(5.5 / 6))  # smoothed: never 0


def test_majority_of_real_gsm8k_chains_of_thought() -> None:
    """Extraction on recorded GSM8K answers: two models' chains, one repeated, vote for the
    repeated one's final number, whatever the wording around it."""
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:60]]
    found = 0
    for row in rows:
        texts = [e["answer"] for e in row["models"].values()]
        numbers = [extract_answer(t, "number") for t in texts]
        if len(set(numbers)) < 2 or None in numbers:
            continue
        # the second model answered twice (e.g. one more sample): its number wins
        v = vote([numbers[0], numbers[1], numbers[1]], "number")
        assert v is not None and v.index == 1 and v.votes == 2
        assert numbers[1] == extract_answer(texts[1], "number")
        found += 1
    assert found >= 5


def _jaccard(a: str, b: str) -> float:
    x, y = set(a.split()), set(b.split())
    return len(x & y) / len(x | y) if x | y else 1.0


def test_medoid_of_real_alpacaeval_answers() -> None:
    """Free text: under normalised exact match a restated answer (other case, punctuation)
    agrees with its original; under a graded agreement the medoid is the brute-force argmax
    of summed agreement, and the confidence is the mean pairwise agreement."""
    row = json.loads(ALPACA_TEST.read_text().splitlines()[0])
    texts = [e["answer"] for e in row["models"].values()]
    restated = texts[2].upper().replace(".", " . ")
    forms = [normalise_text(t) for t in [*texts, restated]]
    exact = medoid(forms, exact_agreement)
    assert exact is not None and exact.index == 2 and exact.votes == 2
    assert exact.agreement == pytest.approx(1 / 10)  # 5 answers, 10 pairs, one agrees
    assert exact.confidence == pytest.approx(share_confidence(0.1, 5))
    graded = medoid(forms, _jaccard)
    sums = [sum(_jaccard(a, b) for b in forms) for a in forms]
    assert graded is not None and graded.index == int(np.argmax(sums))
    pairs = [_jaccard(forms[i], forms[j]) for i in range(5) for j in range(i + 1, 5)]
    assert graded.agreement == pytest.approx(np.mean(pairs))
    assert graded.confidence == pytest.approx(share_confidence(float(np.mean(pairs)), 5))
    with pytest.raises(SamplingError, match=r"\[0, 1\]"):
        medoid(forms, lambda a, b: 2.0)
    # the default is the open-ended signals' graded agreement (character 3-grams)
    default = medoid(forms)
    sums = [sum(agreement(a, b) or 0.0 for b in forms) for a in forms]
    assert default is not None and default.index == int(np.argmax(sums))
    assert default.index == 2  # the restated answer's original: its twin agrees most
    assert vote(forms, "text") == default


def test_sampled_names() -> None:
    assert sampled_name("llama-8b", 5) == "llama-8b@5"
    assert parse_sampled("llama-8b@5") == ("llama-8b", 5)
    assert parse_sampled("llama-8b") is None
    for bad, why in (
        ("a@0", "k must be"),
        ("a@1", "k = 1 is the model itself"),
        ("a@x", "integer"),
        ("tier:a+b@3", "tier"),
        ("a@999", "k must be"),
    ):
        with pytest.raises(SamplingError, match=why):
            parse_sampled(bad)


# ------------------------------------------------------------------ traces and columns


def test_trace_samples_are_parsed_and_checked(sampled: dict[str, Path], tmp_path: Path) -> None:
    traces = load_traces(sampled["independent-train"])
    assert len(traces.samples) == len(traces) and all(
        len(s) == 4 for r in traces.samples for s in r
    )
    line = json.loads(sampled["independent-train"].read_text().splitlines()[0])
    line["models"]["small"]["samples"] = "A"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(line) + "\n")
    with pytest.raises(TraceError, match=r"bad.jsonl:1: models.small.samples must be a list"):
        load_traces(bad)
    assert load_traces(write_choice_traces(tmp_path / "plain.jsonl", n_rows=5)).samples == []


def test_sampled_column_vote_cost_and_tokens(sampled: dict[str, Path]) -> None:
    traces = load_traces(sampled["independent-train"])
    out = add_sampled(traces, parse_samples("3,small@5"))
    assert out.models == ("small", "small@3", "small@5", "large", "large@3")
    j, s3, s5 = 0, 1, 2
    p_out = PRICES["small"][1] / 1e6
    for i in range(40):
        raw = [traces.answers[i][j], *traces.samples[i][j]]
        forms = [extract_answer(a, "choice") for a in raw]
        v = majority(forms[:5])
        extra = sum(count_tokens(a) for a in raw[1:5])
        assert out.cost_usd[i, s5] == pytest.approx(traces.cost_usd[i, j] + extra * p_out)
        assert out.tokens_out[i, s5] == traces.tokens_out[i, j] + extra
        assert out.tokens_in[i, s5] == traces.tokens_in[i, j]  # the prompt is billed once
        assert out.latency_ms[i, s5] == traces.latency_ms[i, j]
        assert v is not None and out.extracted[i][s5] == forms[v.index]
        assert out.correct[i, s5] == (forms[v.index] == traces.references[i])
        assert out.confidence[i, s5] == pytest.approx(share_confidence(v.share, 5))
        assert out.extracted[i][s3] == forms[majority(forms[:3]).index]  # type: ignore[union-attr]
    assert out.reference == out.models.index("large")  # a sampled column is never the reference
    # the vote of independent samples is right more often than one answer (the planted world)
    assert out.correct[:, s5].mean() > traces.correct[:, j].mean() + 0.03


def test_bad_samples_are_refused(sampled: dict[str, Path], tmp_path: Path) -> None:
    traces = load_traces(sampled["independent-train"])
    with pytest.raises(TraceError, match=r"small@6 needs 5 samples of small per row; row 'tr-0'"):
        add_sampled(traces, parse_samples("small@6"))
    for text, why in (("0", "k must be"), ("tier:small+large@3", "tier"), ("x", "neither")):
        with pytest.raises(TraceError, match=why):
            parse_samples(text)
    with pytest.raises(TraceError, match="unknown model 'medium'"):
        add_sampled(traces, parse_samples("medium@3"))
    plain = load_traces(write_choice_traces(tmp_path / "plain.jsonl", n_rows=5))
    with pytest.raises(TraceError, match="no model of the traces holds samples"):
        add_sampled(plain, parse_samples("3"))
    for flag, why in (("6", "needs 5 samples"), ("0", "k must be"), ("tier:small+large@3", "tier")):
        out = tmp_path / f"policy-{flag}.json"
        res = run("fit", "--train", str(sampled["independent-train"]), "--lambda", "0.5",
                  "--out", str(out), "--samples", flag)  # fmt: skip
        assert res.returncode == 2 and why in res.stderr and res.stderr.startswith("error: ")
        assert not out.exists()


# ------------------------------------------------------------------ what the fit finds


def test_fit_recovers_the_planted_self_consistency_relation(sampled: dict[str, Path]) -> None:
    """Independent samples: P(the vote is right | vote share) is planted by the generator;
    the fitted posterior of the sampled node alone matches its frequency on a large
    independent test draw, share by share, and rises with the share."""
    spec = parse_samples("small@5")
    train = add_sampled(load_traces(sampled["independent-train"]), spec)
    test = add_sampled(load_traces(sampled["independent-test"]), spec)
    fitted = FittedIndex(train, recall=True, models=["small@5", "large"])
    node = [fitted.nodes.index(train.models.index("small@5"))]
    col = test.models.index("small@5")
    shares = np.round(np.exp(test.confidence[:, col]) * 6 - 0.5).astype(int)  # votes of 5
    seen = []
    for votes in (2, 3, 4, 5):
        rows = np.flatnonzero(shares == votes)
        if len(rows) < 200:
            continue
        i = int(rows[0])
        p, _, _ = fitted.posterior.best_one(
            node, [test.extracted[i][col], None], [float(test.confidence[i, col]), None]
        )
        freq = float(test.correct[rows, col].mean())
        assert abs(p - freq) < 0.05, (votes, p, freq, len(rows))
        seen.append(p)
    assert len(seen) >= 3 and seen == sorted(seen)  # more agreement, more often right
    assert seen[-1] - seen[0] > 0.3


def test_node_selection_keeps_a_sampled_node_exactly_when_it_pays(sampled: dict[str, Path]) -> None:
    for mode, pays in (("independent", True), ("copies", False)):
        train = add_sampled(load_traces(sampled[f"{mode}-train"]), parse_samples("5"))
        kept = [train.models[j] for j in select_nodes(train)]
        assert ("small@5" in kept or "large@5" in kept) is pays, (mode, kept)


def test_fit_evaluate_and_bench_offer_sampled_nodes(sampled: dict[str, Path], tmp_path: Path):
    """`fit --samples` writes an artifact with a sampled node, `evaluate` rebuilds its column
    from the test traces' samples, and `bench --samples` picks model@k exactly when it pays."""
    policy = tmp_path / "policy.json"
    train = str(sampled["independent-train"])
    res = run("fit", "--train", train, "--lambda", "0.9", "--samples", "small@5",
              "--models", "small@5,large", "--out", str(policy))  # fmt: skip
    assert res.returncode == 0, res.stderr
    art = json.loads(policy.read_text())
    assert [n["model"] for n in art["nodes"]] == ["small@5", "large"]
    res = run("evaluate", "--policy", str(policy), "--test", str(sampled["independent-test"]),
              "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert 0.5 < report["accuracy"] <= 1.0
    folder = tmp_path / "pairs"
    folder.mkdir()
    for mode in ("independent", "copies"):
        for half in ("train", "test"):
            rows = sampled[f"{mode}-{half}"].read_text().splitlines()[:400]
            (folder / f"{mode}-{half}.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    res = run("bench", "--traces", str(folder), "--out", str(out), "--samples", "5")
    assert res.returncode == 0, res.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert any("@5" in m for m in doc["pairs"]["independent"]["nodes"])
    assert not any("@" in m for m in doc["pairs"]["copies"]["nodes"])
    assert "--samples 5" in (out / "bench.md").read_text()


def test_samples_planted_on_recorded_gsm8k_traces(tmp_path: Path) -> None:
    """Samples planted on the shipped GSM8K traces (RouteLLM: Mixtral and GPT-4 chains of
    thought), right with a probability tied to each recorded answer's correctness: the
    vote of Mixtral@5 is graded against the reference and beats Mixtral alone, node selection
    keeps it, and the fitted posterior of the sampled node follows the test frequencies
    share by share. With copies (no information), node selection drops it."""
    from tests.shipped import GSM8K_TRAIN
    from tests.synthetic import write_planted_samples

    mixtral = "mistralai/Mixtral-8x7B-Instruct-v0.1"
    name = f"{mixtral}@5"
    spec = parse_samples(name)

    def loaded(source: Path, mode: str, seed: int):
        path = write_planted_samples(source, tmp_path / f"{mode}-{seed}.jsonl", 4, seed, mode)
        return add_sampled(fill_costs(load_traces(path)), spec)

    train = loaded(GSM8K_TRAIN, "independent", 1)
    col, j = train.models.index(name), train.models.index(mixtral)
    assert train.kind == "number"
    assert train.correct[:, col].mean() > train.correct[:, j].mean() + 0.05
    assert name in [train.models[k] for k in select_nodes(train)]
    copies = loaded(GSM8K_TRAIN, "copies", 1)
    assert name not in [copies.models[k] for k in select_nodes(copies)]
    assert (copies.correct[:, copies.models.index(name)] == copies.correct[:, j]).all()

    test = loaded(GSM8K_TEST, "independent", 2)
    fitted = FittedIndex(train, recall=True, models=[name, "gpt-4-1106-preview"])
    node = [fitted.nodes.index(col)]
    tcol = test.models.index(name)
    votes = np.round(np.exp(test.confidence[:, tcol]) * 6 - 0.5).astype(int)
    seen = []
    for v in (2, 3, 4, 5):
        rows = np.flatnonzero(votes == v)
        if len(rows) < 100:
            continue
        i = int(rows[0])
        p, _, _ = fitted.posterior.best_one(
            node, [test.extracted[i][tcol], None], [float(test.confidence[i, tcol]), None]
        )
        freq = float(test.correct[rows, tcol].mean())
        assert abs(p - freq) < 0.08, (v, p, freq, len(rows))
        seen.append(p)
    assert len(seen) >= 3 and seen == sorted(seen)


def test_free_text_samples_on_real_alpacaeval_answers(tmp_path: Path) -> None:
    """AlpacaEval answers (free text, judged, no reference): samples that restate the
    recorded answer keep its label (the medoid agrees with it); a medoid that is another
    answer cannot be graded without a reference, which is an error naming the row."""
    rows = [json.loads(line) for line in ALPACA_TEST.read_text().splitlines()[:30]]
    first = next(iter(rows[0]["models"]))
    for row in rows:
        entry = row["models"][first]
        entry["samples"] = [entry["answer"].upper(), entry["answer"] + " ", "Something else."]
    agreeing = tmp_path / "agreeing.jsonl"
    agreeing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    traces = fill_costs(load_traces(agreeing))
    assert traces.kind == "text"
    out = add_sampled(traces, parse_samples(f"{first}@4"))
    col, j = out.models.index(f"{first}@4"), out.models.index(first)
    assert (out.correct[:, col] == out.correct[:, j]).all()
    # 3 of 6 pairs restate each other (agreement 1), the others barely overlap: graded,
    # the confidence is the mean pairwise agreement's, a little above half
    expected = []
    for row in rows:
        entry = row["models"][first]
        forms = [extract_answer(t, "text") for t in [entry["answer"], *entry["samples"]]]
        v = vote(forms, "text")
        assert v is not None and v.index in (0, 1, 2)
        expected.append(v.confidence)
    assert np.allclose(out.confidence[:, col], expected)
    assert (out.confidence[:, col] > share_confidence(0.5, 4)).all()
    for row in rows:
        entry = row["models"][first]
        entry["samples"] = ["Something else.", "something else", "SOMETHING ELSE!"]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match=r"row 'alpaca-fusechat-\d+': the vote .* no reference"):
        add_sampled(fill_costs(load_traces(other)), parse_samples(f"{first}@4"))


@pytest.mark.research_traces
def test_samples_planted_on_recorded_mmlu_traces(traces_dir: Path, tmp_path: Path) -> None:
    """The research twin on multiple choice: samples planted on the recorded MMLU llama
    traces (right with a probability tied to each recorded answer's correctness). The vote
    of llama3.2-3b@5 beats the model alone and node selection keeps it; with copies it
    does not; the fitted posterior of the sampled node rises with the vote share and follows
    the test frequencies."""
    from tests.synthetic import write_planted_samples

    name = "llama3.2-3b@5"

    def loaded(half: str, mode: str, seed: int):
        source = traces_dir / f"mmlu-llama-{half}.jsonl"
        path = write_planted_samples(source, tmp_path / f"{mode}-{half}.jsonl", 4, seed, mode)
        return add_sampled(fill_costs(load_traces(path)), parse_samples(name))

    train = loaded("train", "independent", 1)
    col, j = train.models.index(name), train.models.index("llama3.2-3b")
    assert train.kind == "choice"
    assert train.correct[:, col].mean() > train.correct[:, j].mean() + 0.03
    assert name in [train.models[k] for k in select_nodes(train)]
    copies = loaded("train", "copies", 1)
    assert name not in [copies.models[k] for k in select_nodes(copies)]
    test = loaded("test", "independent", 2)
    fitted = FittedIndex(train, recall=True, models=[name, "llama3.1-405b"])
    node = [fitted.nodes.index(col)]
    tcol = test.models.index(name)
    votes = np.round(np.exp(test.confidence[:, tcol]) * 6 - 0.5).astype(int)
    seen = []
    for v in (2, 3, 4, 5):
        rows = np.flatnonzero(votes == v)
        if len(rows) < 100:
            continue
        i = int(rows[0])
        p, _, _ = fitted.posterior.best_one(
            node, [test.extracted[i][tcol], None], [float(test.confidence[i, tcol]), None]
        )
        freq = float(test.correct[rows, tcol].mean())
        assert abs(p - freq) < 0.1, (v, p, freq, len(rows))
        seen.append(p)
    assert len(seen) >= 3 and seen == sorted(seen)
