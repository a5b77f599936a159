"""`cascade collect` end to end: the CLI (the console script once, else in process) against the
fake upstream (a subprocess on 127.0.0.1) answering with the recorded answers of the synthetic
traces (tests/synthetic.py; the research twin: of the real MMLU traces), then `cascade fit`
on what it wrote."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from calibration.traces import load_traces
from cli.main import app
from policies.answers import extract_choice
from tests.serving import CASCADE, REPO, TRACE_PRICES, fake_upstream, upstream_admin
from tests.synthetic import PRICES as SYNTHETIC_PRICES

# cheapest first by price; listed in another order in the config on purpose
CHEAPEST_FIRST = ["small", "big", "large"]
PRICES = {m: SYNTHETIC_PRICES[m] for m in ("large", "small", "big")}
MMLU_CHEAPEST_FIRST = ["llama3.2-1b", "llama3.1-8b", "llama3.1-405b"]
N_ITEMS = 40


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str, process: bool = False) -> Result:
    """The CLI in process (CliRunner: fast); `process` runs the installed console script."""
    if process:
        res = subprocess.run(
            [str(CASCADE), *args], capture_output=True, text=True, timeout=120, cwd=REPO
        )  # with its progress bar (not a terminal: transient)
        return Result(res.returncode, res.stdout, res.stderr)
    got = CliRunner().invoke(app, list(args), env={"CASCADE_NO_PROGRESS": "1"})
    if got.exception is not None and not isinstance(got.exception, SystemExit):
        raise got.exception
    return Result(got.exit_code, got.stdout, got.stderr)


def first_rows(path: Path) -> dict[str, dict]:
    """The first rows of a trace file, by id: what the fake upstream will answer."""
    lines = path.read_text().split("\n")
    rows = [json.loads(line) for line in lines[:N_ITEMS]]
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def recorded(synthetic: tuple[Path, Path]) -> dict[str, dict]:
    """The first rows of the synthetic train traces, which the upstream answers from."""
    return first_rows(synthetic[0])


@pytest.fixture(scope="module")
def upstream(traces_upstream: str) -> str:
    """The fake upstream answering from the synthetic traces (conftest's `traces_upstream`)."""
    return traces_upstream


@pytest.fixture
def http(upstream: str) -> Iterator[httpx.Client]:
    """Admin client on a clean upstream: no faults, counters at zero."""
    with upstream_admin(upstream) as client:
        yield client


def calls(http: httpx.Client) -> dict[str, int]:
    models = http.get("/admin/stats").json()["models"]
    return {m: s["calls"] for m, s in models.items() if s["calls"]}


def write_config(folder: Path, upstream: str, prices: dict, cheapest_first: list[str]) -> Path:
    """A config of the models `prices` (and a `judge`) on `upstream`, with a cascade `mc` over
    `cheapest_first` and a cascade `other`."""
    lines = ["models:"]
    for name, (pin, pout) in [*prices.items(), ("judge", (1.0, 2.0))]:
        lines.append(
            f"  {name}: {{backend: openai, base_url: '{upstream}/v1', max_retries: 0, "
            f"price_in_per_mtok: {pin}, price_out_per_mtok: {pout}}}"
        )
    nodes, first = ", ".join(cheapest_first), cheapest_first[0]
    lines += [
        "cascades:",
        f"  mc: {{nodes: [{nodes}], reference: {cheapest_first[-1]}}}",
        f"  other: {{nodes: [{first}, judge], reference: judge}}",
    ]
    path = folder / "cascade.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def config(upstream: str, tmp_path: Path) -> Path:
    return write_config(tmp_path, upstream, PRICES, CHEAPEST_FIRST)


def lines_of(path: Path) -> list[str]:
    """JSONL lines (split on newlines only: prompts may hold U+2028, which splitlines cuts)."""
    return [line for line in path.read_text().split("\n") if line]


def dataset(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def items(recorded: dict[str, dict], n: int = N_ITEMS, reference: bool = True) -> list[dict]:
    return [
        {
            "id": r["id"],
            "task": r["task"],
            "messages": r["messages"],
            "reference": r["reference"] if reference else None,
        }
        for r in list(recorded.values())[:n]
    ]


def collect(config: Path, data: Path, out: Path, *extra: str, process: bool = False) -> Result:
    return run("collect", "--config", str(config), "--cascade", "mc", "--dataset", str(data),
               "--out", str(out), *extra, process=process)  # fmt: skip


def check_collect_writes_graded_traces_that_fit_reads(
    config: Path,
    recorded: dict,
    http: httpx.Client,
    tmp_path: Path,
    prices: dict,
    cheapest_first: list[str],
) -> None:
    """Collect every recorded prompt from every model of `cheapest_first`: the rows hold the
    recorded answers, graded here as the source labelled them, priced by `prices`; fit reads
    them."""
    out = tmp_path / "traces.jsonl"
    res = collect(config, dataset(tmp_path, items(recorded)), out, "--concurrency", "4",
                  process=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"wrote {N_ITEMS} row(s)" in res.stdout and "grader mc" in res.stdout
    assert calls(http) == dict.fromkeys(cheapest_first, N_ITEMS)

    traces = load_traces(out)
    assert list(traces.models) == cheapest_first
    assert len(traces) == N_ITEMS and traces.kind == "choice"
    rows = {json.loads(line)["id"]: json.loads(line) for line in lines_of(out)}
    spent = 0.0
    for rid, row in rows.items():
        assert row["grader"] == "mc" and row["reference"] == recorded[rid]["reference"]
        for m in cheapest_first:
            got, want = row["models"][m], recorded[rid]["models"][m]
            letter = extract_choice(want["answer"])  # None: no letter in it
            assert got["text"] == want["answer"] and got["answer"] == letter
            assert got["correct"] == want["correct"]  # graded here, labelled by the source
            if letter is None:  # no letter, no letter's logprob
                assert got["confidence"] is None
            else:  # from logprobs
                assert got["confidence"] == pytest.approx(want["confidence"])
            pin, pout = prices[m]
            assert got["tokens_in"] == want["tokens_in"] and got["tokens_out"] == 1
            assert got["cost_usd"] == pytest.approx((got["tokens_in"] * pin + pout) / 1e6)
            assert got["latency_ms"] > 0 and "error" not in got
            spent += got["cost_usd"]
    assert 0.3 < traces.correct.mean() < 0.8  # the labels are not all one value
    assert f"spent ${spent:.4f} this run" in res.stdout

    policy = tmp_path / "p.json"
    fit = run("fit", "--train", str(out), "--out", str(policy), "--lambda", "0.5")
    assert fit.returncode == 0, fit.stderr
    art = json.loads(policy.read_text())
    assert [n["model"] for n in art["nodes"]] == cheapest_first


def test_collect_writes_graded_traces_that_fit_reads(
    config: Path, recorded: dict, http: httpx.Client, tmp_path: Path
) -> None:
    check_collect_writes_graded_traces_that_fit_reads(
        config, recorded, http, tmp_path, PRICES, CHEAPEST_FIRST
    )


@pytest.mark.research_traces
def test_collect_grades_real_mmlu_answers_as_the_source_did(
    traces_dir: Path, tmp_path: Path
) -> None:
    """The same on the real MMLU traces: the recorded letters, graded by `mc`, carry the
    source's own labels, and their confidences survive the trip through logprobs."""
    train = traces_dir / "mmlu-llama-train.jsonl"
    with fake_upstream("judge", "--traces", str(train), log=tmp_path / "stderr.txt") as up:
        config = write_config(tmp_path, up.url, TRACE_PRICES, MMLU_CHEAPEST_FIRST)
        with upstream_admin(up.url) as http:
            check_collect_writes_graded_traces_that_fit_reads(
                config, first_rows(train), http, tmp_path, TRACE_PRICES, MMLU_CHEAPEST_FIRST
            )


def test_resume_skips_collected_ids_and_recollects_a_torn_last_line(
    config: Path, recorded: dict, http: httpx.Client, tmp_path: Path
) -> None:
    out = tmp_path / "traces.jsonl"
    first = collect(config, dataset(tmp_path, items(recorded, 15), "first.jsonl"), out)
    assert first.returncode == 0, first.stderr
    assert calls(http) == dict.fromkeys(CHEAPEST_FIRST, 15)
    lines = [line + "\n" for line in lines_of(out)]
    torn_id = json.loads(lines[-1])["id"]
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a killed write
    http.delete("/admin/stats").raise_for_status()

    again = collect(config, dataset(tmp_path, items(recorded)), out)
    assert again.returncode == 0, again.stderr
    assert "cut a torn last line" in again.stderr
    assert "wrote 26 row(s)" in again.stdout and "(14 already there" in again.stdout
    assert calls(http) == dict.fromkeys(CHEAPEST_FIRST, N_ITEMS - 14)
    traces = load_traces(out)
    assert sorted(traces.ids) == sorted(recorded) and torn_id in traces.ids

    http.delete("/admin/stats").raise_for_status()
    done = collect(config, dataset(tmp_path, items(recorded)), out)
    assert done.returncode == 0 and "wrote 0 row(s)" in done.stdout
    assert calls(http) == {}


def test_the_budget_cap_stops_between_rows(
    config: Path, recorded: dict, http: httpx.Client, tmp_path: Path
) -> None:
    # prompts the traces do not know: the canned one-token answer, every item the same cost
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question number {i:03d}"}],
             "reference": "A"} for i in range(10)]  # fmt: skip
    per_item = sum(3 * pin + pout for pin, pout in PRICES.values()) / 1e6  # 3 words, 1 token
    cap = 4.5 * per_item
    out = tmp_path / "traces.jsonl"
    res = collect(config, dataset(tmp_path, rows), out, "--max-cost-usd", f"{cap:.10f}",
                  "--concurrency", "3")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "stopped at the budget cap" in res.stdout and "6 item(s) left" in res.stdout
    traces = load_traces(out)
    assert len(traces) == 4  # whole rows only, and no row started past the cap
    assert traces.cost_usd.sum() == pytest.approx(4 * per_item) and traces.cost_usd.sum() <= cap
    assert calls(http) == dict.fromkeys(CHEAPEST_FIRST, 4)
    rest = collect(config, dataset(tmp_path, rows), out)  # no cap: the rest
    assert rest.returncode == 0 and "wrote 6 row(s)" in rest.stdout
    assert len(load_traces(out)) == 10


def test_an_upstream_fault_is_recorded_not_fatal(
    config: Path, recorded: dict, http: httpx.Client, tmp_path: Path
) -> None:
    fault = {"model": "big", "error_rate": 1, "error_status": 503, "count": 3}
    http.post("/admin/faults", json=fault).raise_for_status()
    http.post("/admin/faults", json={"model": "small", "drop": 1, "count": 2})
    out = tmp_path / "traces.jsonl"
    res = collect(config, dataset(tmp_path, items(recorded)), out)
    assert res.returncode == 0, res.stderr
    assert "failed calls (recorded in the rows): small 2, big 3" in res.stdout
    traces = load_traces(out)
    assert len(traces) == N_ITEMS
    rows = [json.loads(line) for line in lines_of(out)]
    errors = [(m, e["error"]) for r in rows for m, e in r["models"].items() if "error" in e]
    assert sorted(errors) == [("big", "http_503")] * 3 + [("small", "connection")] * 2
    for r in rows:
        for e in r["models"].values():
            if "error" in e:
                assert e["answer"] is None and e["correct"] is False and e["cost_usd"] == 0.0
    assert traces.correct[:, 2].sum() == sum(
        recorded[r]["models"]["large"]["correct"] for r in traces.ids
    )
    policy = tmp_path / "p.json"
    fit = run("fit", "--train", str(out), "--out", str(policy), "--lambda", "0.5")
    assert fit.returncode == 0, fit.stderr


def test_a_judge_grades_without_references_and_its_cost_is_logged(
    config: Path, recorded: dict, http: httpx.Client, tmp_path: Path
) -> None:
    """The judge compares each answer with the reference model's (pairwise, from the logprob
    of its A/B verdict, in both orders) and the trace records the graded `quality` that `fit
    --label quality` reads. This judge always says A: its taste for the first position
    cancels out, so every answer ties with the reference model's."""
    verdict = {"model": "judge", "answer": "A", "confidence": -0.3}
    http.post("/admin/answers", json=verdict).raise_for_status()
    out = tmp_path / "traces.jsonl"
    data = dataset(tmp_path, items(recorded, 6, reference=False))
    res = collect(config, data, out, "--grader", "judge:judge")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in lines_of(out)]
    assert len(rows) == 6 and all(r["grader"] == "judge:judge" for r in rows)
    reference = CHEAPEST_FIRST[-1]
    others = [e for r in rows for m, e in r["models"].items() if m != reference]
    assert all(e["quality"] == pytest.approx(0.5) for e in others)  # not exp(-0.3) = 0.74
    assert all(e["correct"] is True and e["grader_cost_usd"] > 0 for e in others)
    own = [r["models"][reference] for r in rows]  # against itself: a tie, never asked
    assert all(e["quality"] == 0.5 and e["grader_cost_usd"] is None for e in own)
    graded = sum(e["grader_cost_usd"] for e in others)
    assert f"(grading ${graded:.4f})" in res.stdout
    assert calls(http)["judge"] == 24  # two verdicts per answer but the reference model's
    traces = load_traces(out).with_label("quality")
    assert traces.correct[:, traces.models.index(reference)].tolist() == [0.5] * 6

    http.post("/admin/answers", json={"model": "judge", "answer": "Perhaps"}).raise_for_status()
    more = dataset(tmp_path, items(recorded, 9, reference=False), "more.jsonl")
    vague = collect(config, more, out, "--grader", "judge:judge")
    assert vague.returncode == 0, vague.stderr
    assert "3 item(s) not written: the judge gave no verdict" in vague.stdout
    assert len(load_traces(out)) == 6  # an unlabelled row is never written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grader": "mcq"}, "unknown grader 'mcq'; expected one of: mc, numeric"),
        ({"grader": "judge:gpt-9"}, "model 'gpt-9' is not in the configuration"),
        ({"cascade": "nope"}, "no cascade 'nope' in the configuration (cascades: mc, other)"),
        ({"bad_line": '{"id": "x", "messages": []}'}, "data.jsonl:3: missing or empty field"),
        ({"no_reference": True}, "data.jsonl:1: field 'reference' is missing or null"),
        ({"other_models": True}, "rows have models"),
    ],
)
def test_bad_input_is_one_clear_error(
    config: Path, recorded: dict, http: httpx.Client, tmp_path: Path, change, message
) -> None:
    rows = items(recorded, 2, reference=not change.get("no_reference"))
    data = dataset(tmp_path, rows)
    if "bad_line" in change:
        data.write_text(data.read_text() + change["bad_line"] + "\n")
    out = tmp_path / "traces.jsonl"
    if change.get("other_models"):
        out.write_text(json.dumps({"id": "z", "models": {"a": {}}}) + "\n")
    args = ["collect", "--config", str(config), "--cascade", change.get("cascade", "mc"),
            "--dataset", str(data), "--out", str(out)]  # fmt: skip
    if "grader" in change:
        args += ["--grader", change["grader"]]
    res = run(*args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert calls(http) == {}
