"""The `cascade` console script, run as a real process: fit, evaluate, bench, and bad input,
on the synthetic traces (tests/synthetic.py) and the GSM8K traces shipped in proxy/demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import demo

CASCADE = Path(sys.executable).with_name("cascade")
POLICY_FIELDS = {"curve", "cost_to_match", "cost_to_match_1pp", "acc_at_20", "acc_at_50", "auc"}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CASCADE_NO_PROGRESS": "1"}
    return subprocess.run(
        [str(CASCADE), *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


@pytest.fixture(scope="module")
def policy(synthetic: tuple[Path, Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "policy.json"
    res = run(
        "fit", "--train", str(synthetic[0]),
        "--target-accuracy", "0.97", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "expected on train" in res.stdout
    return out


def test_fit_writes_a_hash_identified_artifact(policy: Path) -> None:
    art = json.loads(policy.read_text())
    assert art["schema"] == "cascade.policy/v1"
    assert art["hash"].startswith("sha256:")
    assert art["training"]["target"]["target_accuracy"] == 0.97
    assert art["expected"]["accuracy"] >= 0.97 * art["training"]["reference_accuracy"] - 1e-9


def test_evaluate_prints_json_with_where_queries_stop(policy: Path, synthetic) -> None:
    res = run("evaluate", "--policy", str(policy), "--test", str(synthetic[1]), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["rows"] == 300
    assert 0.5 < report["accuracy"] <= 1.0
    assert report["calls_per_query"] >= 1.0
    assert sum(report["stops_at"].values()) == pytest.approx(1.0)
    table = run("evaluate", "--policy", str(policy), "--test", str(synthetic[1]))
    assert table.returncode == 0 and "answer not the last explored" in table.stdout


def test_fit_with_named_models_and_a_budget(synthetic, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    res = run("fit", "--train", str(synthetic[0]), "--models", "small,large",
              "--max-cost-usd", "0.00005", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    art = json.loads(out.read_text())
    assert [n["model"] for n in art["nodes"]] == ["small", "large"]
    assert art["expected"]["mean_cost_usd"] <= 0.00005 < art["reference_cost_usd"]


@pytest.mark.research_traces
def test_fit_free_text_traces_with_named_models_and_a_budget(
    traces_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.json"
    res = run("fit", "--train", str(traces_dir / "triviaqa-qwen_oai-train.jsonl"),
              "--models", "gpt-4o-mini,gpt-4o", "--max-cost-usd", "0.0005",
              "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    art = json.loads(out.read_text())
    assert [n["model"] for n in art["nodes"]] == ["gpt-4o-mini", "gpt-4o"]
    assert art["expected"]["mean_cost_usd"] <= 0.0005


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lambda", "0.5", "--target-accuracy", "0.9"], "exactly one of"),
        ([], "exactly one of"),
        (["--lambda", "2"], "--lambda must be in"),
        (["--lambda", "0.5", "--models", "small,gpt-9"], "unknown model"),
    ],
)
def test_fit_rejects_bad_options(synthetic, tmp_path: Path, args, message) -> None:
    out = tmp_path / "p.json"
    res = run("fit", "--train", str(synthetic[0]),
              "--out", str(out), *args)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and message in res.stderr, res.stderr
    assert not out.exists()


def test_a_corrupt_trace_file_is_an_error_naming_the_line(tmp_path: Path, synthetic) -> None:
    lines = synthetic[0].read_text().split("\n")
    lines[6] = lines[6][:50]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines))
    out = tmp_path / "p.json"
    res = run("fit", "--train", str(bad), "--lambda", "0.9", "--out", str(out))
    assert res.returncode == 2
    assert f"{bad}:7: malformed JSON" in res.stderr
    assert not out.exists()


def test_a_missing_or_edited_policy_is_an_error(tmp_path: Path, policy: Path, synthetic) -> None:
    test = str(synthetic[1])
    res = run("evaluate", "--policy", str(tmp_path / "none.json"), "--test", test)
    assert res.returncode == 2 and "does not exist" in res.stderr
    art = json.loads(policy.read_text())
    art["lambda"] = 0.123
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(art))
    res = run("evaluate", "--policy", str(edited), "--test", test)
    assert res.returncode == 2 and "does not match its hash" in res.stderr
    res = run("evaluate", "--policy", str(policy), "--test", str(demo.TEST))  # other models
    assert res.returncode == 2 and "needs model(s)" in res.stderr


def test_help_explains_every_command() -> None:
    res = run("--help")
    assert res.returncode == 0
    for command in ("fit", "evaluate", "bench"):
        assert command in res.stdout
    assert "--target-accuracy" in run("fit", "--help").stdout


def test_bench_writes_json_markdown_and_plots(tmp_path: Path, synthetic) -> None:
    folder = tmp_path / "traces"
    folder.mkdir()
    for path in (demo.TRAIN, demo.TEST):  # the shipped gsm8k-routellm pair
        shutil.copy(path, folder / path.name)
    shutil.copy(synthetic[0], folder / "lonely-train.jsonl")  # a train file without its test
    write_corrupt_pair(folder, "broken")
    out = tmp_path / "out"
    res = run("bench", "--traces", str(folder), "--out", str(out))
    # the lone and the broken pair are skipped with their reasons (exit 1); the good one runs
    assert res.returncode == 1, res.stderr
    assert "skipped lonely" in res.stderr
    assert "skipped broken: " in res.stderr and "broken-train.jsonl:2" in res.stderr
    doc = json.loads((out / "bench.json").read_text())
    assert list(doc["pairs"]) == ["gsm8k-routellm"]
    assert any(s.startswith("skipped broken: ") for s in doc["skipped"])
    assert not (out / "broken.png").exists()
    pair = doc["pairs"]["gsm8k-routellm"]
    assert pair["reference_model"] == "gpt-4-1106-preview"
    assert pair["reference_cost_usd"] > 0
    assert set(pair["best_single"]) == {"model", "accuracy"}
    names = set(pair["policies"])
    assert {"index", "index-norecall", "threshold", "agreement", "singles",
            "oracle-routing", "oracle-cascade"} <= names  # fmt: skip
    assert "single:gpt-4-1106-preview" in names
    for stats in pair["policies"].values():
        assert set(stats) >= POLICY_FIELDS
        assert 0.0 <= stats["auc"] <= 1.0
        for point in stats["curve"]:
            assert set(point) == {"knob", "accuracy", "cost"}
    single = pair["policies"]["single:gpt-4-1106-preview"]
    assert len(single["curve"]) == 1 and single["curve"][0]["cost"] == pytest.approx(1.0)
    assert single["curve"][0]["accuracy"] == pytest.approx(pair["best_single"]["accuracy"])
    md = (out / "bench.md").read_text()
    assert "tiktoken" in md and "price map" in md
    assert "oracle_savings" in md
    assert (out / "gsm8k-routellm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_on_a_folder_without_pairs_is_an_error(tmp_path: Path) -> None:
    res = run("bench", "--traces", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "no NAME-train.jsonl" in res.stderr


def write_corrupt_pair(folder: Path, name: str) -> None:
    """A pair whose train file has a malformed second line."""
    row = {"id": "q1", "task": "mmlu", "reference": "A", "messages": [{"role": "user",
           "content": "?"}], "models": {"m": {"answer": "A", "correct": True, "confidence": -0.1,
           "cost_usd": 1e-6, "latency_ms": 1.0, "tokens_in": 3, "tokens_out": 1}}}  # fmt: skip
    (folder / f"{name}-train.jsonl").write_text(json.dumps(row) + "\n{not json\n")
    (folder / f"{name}-test.jsonl").write_text(json.dumps(row) + "\n")


def test_bench_where_no_pair_can_run_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    write_corrupt_pair(tmp_path, "broken")
    out = tmp_path / "o"
    res = run("bench", "--traces", str(tmp_path), "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert "could be benchmarked" in res.stderr and "broken-train.jsonl:2" in res.stderr
    assert not out.exists()


def test_a_pair_whose_halves_list_the_models_in_another_order_is_read_in_train_order(
    tmp_path: Path, synthetic
) -> None:
    from calibration.bench import Pair, PairError, load_pair

    shutil.copy(synthetic[0], tmp_path / "p-train.jsonl")
    rows = [json.loads(line) for line in synthetic[1].open()][:40]
    with (tmp_path / "p-test.jsonl").open("w") as f:
        for row in rows:
            row["models"] = dict(reversed(list(row["models"].items())))
            f.write(json.dumps(row) + "\n")
    train, test = load_pair(Pair("p", tmp_path / "p-train.jsonl", tmp_path / "p-test.jsonl"))
    assert test.models == train.models
    first = rows[0]["models"]
    for k, name in enumerate(test.models):
        assert test.correct[0, k] == first[name]["correct"]
        assert test.cost_usd[0, k] == pytest.approx(first[name]["cost_usd"])
    for row in rows:  # a model the train half does not have is still refused
        row["models"]["extra"] = row["models"]["small"]
    (tmp_path / "p-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PairError, match="different models"):
        load_pair(Pair("p", tmp_path / "p-train.jsonl", tmp_path / "p-test.jsonl"))
