"""Graded labels (`quality` in [0, 1]) through fit, evaluate and bench, on the shipped
AlpacaEval slice (tests/shipped.py; the full pair as a research test): `fit --label
quality` regresses quality, evaluate scores the label the artifact records, and bench draws
a mean-quality curve beside the accuracy curve, each from its own fit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from calibration.bench import Pair, run_pair
from calibration.evaluate import replay_artifact
from calibration.logistic import fit_logistic
from calibration.traces import load_traces
from policies.artifact import PolicyArtifact
from tests.serving import CASCADE
from tests.shipped import ALPACA_TEST, ALPACA_TRAIN, GSM8K_TRAIN

CURVE_FIELDS = {"curve", "cost_to_match", "cost_to_match_1pp", "acc_at_20", "acc_at_50", "auc"}


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CASCADE_NO_PROGRESS": "1"}
    return subprocess.run(
        [str(CASCADE), *args], capture_output=True, text=True, timeout=600, env=env
    )


def test_graded_labels_regress_their_mean_and_boolean_ones_are_classified_as_before() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    hard = rng.random(400) < 1 / (1 + np.exp(-(x[:, 0] - 0.5 * x[:, 1])))
    # 0/1 as floats: the same fit as the booleans (each row weighs 1 on its own label)
    as_bool, as_float = fit_logistic(x, hard, 1.0, 500), fit_logistic(x, hard * 1.0, 1.0, 500)
    assert np.allclose(as_bool.coef_, as_float.coef_, atol=1e-4)
    # graded: the fitted p tracks E[quality], which a classifier of quality >= 0.5 cannot
    quality = np.clip(0.3 + 0.1 * x[:, 0], 0.0, 1.0)
    soft = fit_logistic(x, quality, 1.0, 500)
    p = soft.predict_proba(x)[:, 1]
    assert abs(p.mean() - quality.mean()) < 0.01
    assert np.corrcoef(p, quality)[0, 1] > 0.99


@pytest.fixture(scope="module")
def quality_policy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graded") / "policy.json"
    res = run("fit", "--train", str(ALPACA_TRAIN), "--label", "quality",
              "--target-accuracy", "0.9", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "mean quality" in res.stdout
    return out


def test_fit_on_quality_records_its_label_and_a_target_in_mean_quality(
    quality_policy: Path,
) -> None:
    art = json.loads(quality_policy.read_text())
    assert art["label"] == "quality"
    train = load_traces(ALPACA_TRAIN)
    ref = train.reference
    # the target is a share of the reference model's mean quality, not of its accuracy
    assert art["training"]["reference_accuracy"] == pytest.approx(train.quality[:, ref].mean())
    assert art["training"]["reference_accuracy"] != pytest.approx(train.correct[:, ref].mean())
    assert art["expected"]["accuracy"] >= 0.9 * train.quality[:, ref].mean() - 1e-9


def test_evaluate_scores_a_quality_policy_by_the_mean_quality_it_returns(
    quality_policy: Path,
) -> None:
    res = run("evaluate", "--policy", str(quality_policy), "--test", str(ALPACA_TEST), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["label"] == "quality"
    test = load_traces(ALPACA_TEST)
    art = PolicyArtifact.from_dict(json.loads(quality_policy.read_text()))
    o = replay_artifact(art, test.with_label("quality"))
    returned = test.quality[np.arange(len(test)), o.answer_model]
    assert report["accuracy"] == pytest.approx(returned.mean())
    assert report["reference_accuracy"] == pytest.approx(test.quality[:, test.reference].mean())


def test_the_default_label_is_correct(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    res = run("fit", "--train", str(ALPACA_TRAIN), "--lambda", "0.9", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["label"] == "correct"
    report = json.loads(
        run("evaluate", "--policy", str(out), "--test", str(ALPACA_TEST), "--json").stdout
    )
    assert report["label"] == "correct"
    assert report["reference_accuracy"] == pytest.approx(
        load_traces(ALPACA_TEST).correct[:, -1].mean()
    )


def test_a_quality_fit_on_traces_without_quality_is_refused_and_writes_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "p.json"
    res = run("fit", "--train", str(GSM8K_TRAIN), "--label", "quality", "--lambda", "0.9",
              "--out", str(out))  # fmt: skip
    assert res.returncode == 2
    assert str(GSM8K_TRAIN) in res.stderr and "no model records `quality`" in res.stderr
    assert not out.exists()
    bad = run("fit", "--train", str(ALPACA_TRAIN), "--label", "stars", "--lambda", "0.9",
              "--out", str(out))  # fmt: skip
    assert bad.returncode == 2 and "unknown label 'stars'" in bad.stderr
    assert not out.exists()


def check_quality_curve(result: dict, test_path: Path) -> None:
    """The quality curve's fields, and that it reads mean quality, not accuracy."""
    test = load_traces(test_path)
    quality = result["quality"]
    assert set(quality) == {"best_single", "policies", "oracle_savings", "root_choice"}
    assert quality["root_choice"]["index"]["kind"] in ("difficulty", "router", "none")
    means = test.quality.mean(axis=0)
    assert quality["best_single"]["accuracy"] == pytest.approx(means.max())
    assert quality["best_single"]["model"] == test.models[int(np.argmax(means))]
    for name in ("index", "index-norecall", "threshold", "agreement", "singles"):
        assert set(quality["policies"][name]) >= CURVE_FIELDS, name
    for j, model in enumerate(test.models):
        point = quality["policies"][f"single:{model}"]["curve"][0]
        assert point["accuracy"] == pytest.approx(means[j])
        correct = result["policies"][f"single:{model}"]["curve"][0]
        assert correct["accuracy"] == pytest.approx(test.correct[:, j].mean())
    index = quality["policies"]["index"]
    assert 0.0 < index["auc"] < quality["policies"]["oracle-routing"]["auc"]


def test_bench_draws_a_mean_quality_curve_beside_the_accuracy_curve(
    tmp_path: Path, synthetic
) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    shutil.copy(ALPACA_TRAIN, folder / "alpaca-train.jsonl")
    shutil.copy(ALPACA_TEST, folder / "alpaca-test.jsonl")
    shutil.copy(synthetic[0], folder / "mc-train.jsonl")  # no quality: one curve
    shutil.copy(synthetic[1], folder / "mc-test.jsonl")
    out = tmp_path / "out"
    res = run("bench", "--traces", str(folder), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "alpaca: index AUC" in res.stdout and "; quality: index AUC" in res.stdout
    assert "mean quality against cost: 1 graded pair(s)" in res.stdout
    doc = json.loads((out / "bench.json").read_text())
    assert "quality" not in doc["pairs"]["mc"]
    check_quality_curve(doc["pairs"]["alpaca"], ALPACA_TEST)
    assert set(doc["summary_quality"]["index"]) >= {"auc", "cost_to_match_1pp", "acc_at_20"}
    assert doc["summary_quality"]["index"]["auc"] == pytest.approx(
        doc["pairs"]["alpaca"]["quality"]["policies"]["index"]["auc"]
    )
    md = (out / "bench.md").read_text()
    assert "## Mean quality against cost (pairs with graded labels)" in md
    assert "## Quality: area under the mean-quality-cost curve" in md
    quality_md = md[md.index("## Mean quality against cost") : md.index("## Index policy against")]
    assert "| alpaca |" in quality_md and "| mc |" not in quality_md
    assert (out / "alpaca-quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "mc-quality.png").exists()


@pytest.mark.research_traces
def test_the_full_alpaca_pair_has_both_curves(traces_dir: Path) -> None:
    pair = Pair(
        "alpaca-fusechat",
        traces_dir / "alpaca-fusechat-train.jsonl",
        traces_dir / "alpaca-fusechat-test.jsonl",
    )
    result = run_pair(pair).result
    assert result["test_rows"] == 407
    check_quality_curve(result, pair.test)


def test_text_calibrators_fit_graded_labels_out_of_fold() -> None:
    """The free-text calibrators regress quality like every other calibrator (they once
    required two classes, so a `--label quality` fit silently had none)."""
    from calibration.textfit import held_out
    from policies.textcal import GROUPS, feature_columns

    train = load_traces(ALPACA_TRAIN).with_label("quality")
    node = train.n_models - 1
    prompts = [train.prompt(i) for i in range(len(train))]
    feats = feature_columns(train.answers, train.tokens_out, prompts, [node])[:, 0]
    y = train.correct[:, node]
    assert y.dtype != bool and len(np.unique(y)) > 2  # graded
    fold = np.arange(len(train)) % 5
    lp = held_out(feats, train.confidence[:, node], y, GROUPS["length"], False, fold)
    answered = ~np.isnan(feats[:, 0])
    assert np.isfinite(lp[answered]).all()
    assert abs(np.exp(lp[answered]).mean() - y[answered].mean()) < 0.05
