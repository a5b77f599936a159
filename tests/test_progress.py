"""Progress of long work, through the real console script: `bench` prints each pair's
verdict as the pair finishes (one plain line per pair when not on a terminal), and on a
terminal (a pseudo-terminal here) `bench` and `fit` draw their progress: pairs and policies
done, fit's phases, time left."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from calibration.bench import BASELINES
from tests.serving import CASCADE
from tests.shipped import ALPACA_TEST, ALPACA_TRAIN

VERDICT = re.compile(
    r"^(?P<pair>[a-z]+): index AUC (?P<index>0\.\d{4}), best baseline "
    r"(?P<best>threshold|agreement|singles) (?P<auc>0\.\d{4}), cost within 1 pt "
    r"(?P<within>\d\.\d{3}|never)(?:; quality: [^()]+)? \(\d+\.\d s\)$"
)


@pytest.fixture(scope="module")
def pairs(synthetic: tuple[Path, Path], tmp_path_factory) -> Path:
    """Two small pairs, benchmarked in that order: `a`, the synthetic multiple-choice traces
    (tests/synthetic.py), and `b`, the shipped AlpacaEval slice (tests/shipped.py)."""
    folder = tmp_path_factory.mktemp("pairs")
    sources = (("a", *synthetic), ("b", ALPACA_TRAIN, ALPACA_TEST))
    for name, train, test in sources:
        shutil.copy(train, folder / f"{name}-train.jsonl")
        shutil.copy(test, folder / f"{name}-test.jsonl")
    return folder


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CASCADE_NO_PROGRESS", "COLUMNS")}
    return {**env, **extra}


def test_bench_prints_each_pairs_verdict_as_it_finishes(pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(CASCADE), "bench", "--traces", str(pairs), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    first = proc.stdout.readline()
    written_before_the_first_verdict = (out / "bench.json").exists()
    rest, errors = proc.communicate(timeout=600)
    assert proc.returncode == 0, errors
    assert not written_before_the_first_verdict  # printed while the bench still ran
    lines = [first.rstrip("\n"), *rest.splitlines()]
    verdicts = [VERDICT.match(line) for line in lines[:2]]
    assert all(verdicts), lines[:3]
    doc = json.loads((out / "bench.json").read_text())
    for match in verdicts:
        policies = doc["pairs"][match["pair"]]["policies"]
        assert match["index"] == f"{policies['index']['auc']:.4f}"
        best = max(BASELINES, key=lambda n: policies[n]["auc"])
        assert (match["best"], match["auc"]) == (best, f"{policies[best]['auc']:.4f}")
        within = policies["index"]["cost_to_match_1pp"]
        assert match["within"] == ("never" if within is None else f"{within:.3f}")
    assert [m["pair"] for m in verdicts] == ["a", "b"]
    # the prompt router runs on every pair; the length-only ablation on the open-ended one
    for name in ("a", "b"):
        router = doc["pairs"][name]["policies"]["prerouter"]
        assert len(router["curve"]) >= 2 and 0.0 < router["auc"] < 1.0
    assert "index-length" in doc["pairs"]["b"]["policies"]
    assert "index-length" not in doc["pairs"]["a"]["policies"]
    md = (out / "bench.md").read_text()
    assert "prerouter" in md and "index-length" in md
    assert not any(VERDICT.match(line) for line in lines[2:])  # one line per pair
    assert "\r" not in rest + errors and "\x1b[" not in rest + errors  # no bar off a terminal


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run the console script with stderr on a pseudo-terminal (stdout a pipe): its exit
    status, stdout, and what the terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(CASCADE), *args], stdout=subprocess.PIPE, stderr=slave, cwd=cwd, text=True,
        env=_env(TERM="xterm-256color", COLUMNS="160"),
    )  # fmt: skip
    os.close(slave)
    shown: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other end is closed
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    out, _ = proc.communicate(timeout=600)
    reader.join(30)
    os.close(master)
    screen = b"".join(shown).decode("utf-8", "replace")
    screen = re.sub(r"\x1b\[[0-9;]*m", "", screen)  # colours
    # every redraw on a line of its own: cursor moves and carriage returns cut lines
    return proc.returncode, out, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "\n", screen)


def test_bench_on_a_terminal_shows_pairs_and_policies_done(pairs: Path, tmp_path: Path) -> None:
    code, out, screen = _on_a_terminal(
        ["bench", "--traces", str(pairs), "--out", str(tmp_path / "out")], tmp_path
    )
    assert code == 0, screen[-2000:]
    assert re.search(r"(?m)^bench .* 1/2 +pairs +\d:\d\d:\d\d \d:\d\d:\d\d", screen), screen[-2000:]
    for pair in ("a", "b"):  # each pair's policies, done of how many; time spent and left
        assert re.search(rf"(?m)^{pair} .* (\d+)/\d+ policies \d:\d\d:\d\d \d:\d\d:\d\d", screen)
    assert len([line for line in out.splitlines() if VERDICT.match(line)]) == 2


def test_fit_on_a_terminal_shows_its_phases(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    code, out, screen = _on_a_terminal(
        ["fit", "--train", str(synthetic[0]),
         "--target-accuracy", "0.97", "--out", str(policy)],
        tmp_path,
    )  # fmt: skip
    assert code == 0, screen[-2000:]
    for phase in ("nodes", "answer posterior", "bins and shrinkage (cross-validation)",
                  "lambda search", "baselines and decision tables"):  # fmt: skip
        assert f"fit: {phase}" in screen, phase
    assert re.search(r"fit: bins and shrinkage \(cross-validation\).*\b15/15\b", screen)
    assert "wrote " in out and policy.is_file()


def test_fit_off_a_terminal_prints_only_its_summary(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    res = subprocess.run(
        [str(CASCADE), "fit", "--train", str(synthetic[0]),
         "--lambda", "0.9", "--out", str(tmp_path / "p.json")],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "fit: " not in res.stdout + res.stderr and "\x1b[" not in res.stderr
    assert res.stdout.startswith("wrote ")
