"""Sampled nodes served end to end: the proxy samples `small@5` with one `n: 5` call (or five
parallel calls, as the config says) from a fake upstream that answers with controlled
disagreement, votes, shows the vote in the response, and ledgers one row per upstream call
with k and the vote share; a config and an artifact that disagree on sampled nodes are
refused, naming the node; the ledger migration goes up and down on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import inspect

from calibration.artifact import build_artifact, load_artifact, save_artifact
from calibration.fit import FittedIndex
from calibration.sampling import add_sampled, parse_samples
from calibration.traces import load_traces
from policies.artifact import ArtifactError
from policies.sampling import majority
from proxy.engine.cascade import CascadeEngine
from proxy.ledger.db import downgrade, make_engine, upgrade
from tests.serving import (
    QUESTION,
    db_upgrade,
    running_proxy,
    sqlite_env,
    start_proxy,
    write_config,
)
from tests.synthetic import write_choice_traces

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


@pytest.fixture(scope="module")
def sampled_policy(tmp_path_factory) -> Path:
    """A line `small@5 -> large` fitted on synthetic traces whose samples are independent."""
    folder = tmp_path_factory.mktemp("sampled-policy")
    train = write_choice_traces(folder / "train.jsonl", models=["small", "large"], n_rows=600,
                                seed=1, prefix="tr", samples=4)  # fmt: skip
    traces = add_sampled(load_traces(train), parse_samples("small@5"))
    fitted = FittedIndex(traces, recall=True, models=["small@5", "large"], transitions="line")
    art = build_artifact(fitted, 0.05, train_path=str(train), answer_kind="choice")
    path = folder / "policy.json"
    save_artifact(art, path)
    return path


def _config(upstream: str, policy: Path, nodes: list, sampling: str = "n") -> dict:
    models = {
        m: {
            "backend": "openai",
            "base_url": f"{upstream}/v1",
            "price_in_per_mtok": p,
            "price_out_per_mtok": p,
            **({"sampling": sampling} if m == "small" else {}),
        }
        for m, p in (("small", 0.1), ("large", 3.0))
    }
    cascade = {"nodes": nodes, "transitions": "line", "reference": "large", "policy": str(policy)}
    return {"models": models, "cascades": {"qa": cascade}}


def _rows(db: Path, request_id: str, n: int) -> list:
    with sqlite3.connect(db) as conn:
        deadline = time.monotonic() + 10
        rows: list = []
        while len(rows) < n and time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT model, samples, vote_share, agreement, tokens_out FROM ledger_calls "
                "WHERE request_id = ? ORDER BY call_order",
                (request_id,),
            ).fetchall()
            time.sleep(0.1)
    return rows


@pytest.mark.parametrize("sampling", ["n", "parallel"])
def test_the_proxy_samples_votes_and_ledgers_each_call(
    upstream: str, sampled_policy: Path, tmp_path: Path, sampling: str
) -> None:
    up = httpx.Client(base_url=upstream, timeout=5.0)
    up.delete("/admin/faults").raise_for_status()
    up.delete("/admin/stats").raise_for_status()
    up.post("/admin/answers", json=[
        {"model": "small", "answer": "B", "confidence": -0.01, "samples": ["C", "B", "A", "B"]},
        {"model": "large", "answer": "B", "confidence": -0.01},
    ]).raise_for_status()  # fmt: skip
    config = _config(upstream, sampled_policy, ["small@5", "large"], sampling)
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    with running_proxy(write_config(tmp_path, config), env) as proxy:
        messages = [{"role": "user", "content": QUESTION}]
        reply = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "qa", "messages": messages},
            timeout=20.0,
        )
        refused = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "qa", "messages": messages, "n": 3},
            timeout=20.0,
        )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "n_not_supported"
    assert reply.status_code == 200, reply.text
    body = reply.json()
    first = body["cascade"]["calls"][0]
    assert first["model"] == "small@5"
    vote = first["vote"]
    assert (vote["k"], vote["votes"], vote["share"]) == (5, 3, 0.6)
    assert sorted(vote["answers"]) == ["A", "B", "B", "B", "C"]
    assert vote["agreement"] == pytest.approx(3 / 10)  # of 10 pairs, the three B-B pairs agree
    stats = up.get("/admin/stats").json()["models"]
    calls = len(body["cascade"]["calls"])
    if sampling == "n":
        assert stats["small"]["calls"] == 1  # one call, n: 5
        expected_rows = calls
    else:
        assert stats["small"]["calls"] == 5 and [m["answer"] for m in first["members"]]
        expected_rows = 5 + calls - 1
    assert reply.headers["x-cascade-calls"] == str(expected_rows)
    if calls == 1:
        assert body["choices"][0]["message"]["content"] == "B"
    rows = _rows(tmp_path / "ledger.db", reply.headers["x-request-id"], expected_rows)
    assert len(rows) == expected_rows
    sampled_rows = rows[:1] if sampling == "n" else rows[:5]
    assert all(r[1] == 5 and r[2] == pytest.approx(0.6) for r in sampled_rows)
    assert all(r[1] is None and r[2] is None for r in rows[len(sampled_rows) :])
    if sampling == "n":
        assert sampled_rows[0][0] == "small@5" and sampled_rows[0][4] == 5  # every sample's tokens
    else:
        assert sorted(r[3] for r in sampled_rows) == [0, 0, 1, 1, 1]  # voted with B or not


def test_serve_refuses_a_config_and_artifact_that_disagree_on_sampled_nodes(
    upstream: str, sampled_policy: Path, tmp_path: Path
) -> None:
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    config = write_config(tmp_path, _config(upstream, sampled_policy, ["small@3", "large"]))
    running = start_proxy(config, env)
    _, err = running.proc.communicate(timeout=60)
    assert running.proc.returncode == 2
    assert err.startswith("error: ") and "['small@3']" in err and "['small@5']" in err
    art = load_artifact(sampled_policy)
    backends = {"small": object(), "large": object()}
    for nodes, named in (
        (["small", "large"], r"artifact has sampled node\(s\) \['small@5'\]"),
        (["small@3", "large"], r"config names sampled node\(s\) \['small@3'\]"),
    ):
        with pytest.raises(ArtifactError, match=named):
            CascadeEngine("qa", nodes, backends, "large", artifact=art, transitions="skips")  # type: ignore[arg-type]
    CascadeEngine("qa", ["small@5", "large"], backends, "large", artifact=art)  # type: ignore[arg-type]


def test_config_refuses_bad_sampled_nodes(upstream: str, sampled_policy: Path, tmp_path: Path):
    from proxy.config import ConfigError, load_config

    for nodes, why in (
        (["small@0", "large"], "k must be"),
        (["tier:small+large@3", "large"], "tier"),
        (["medium@3", "large"], "unknown model"),
    ):
        path = write_config(tmp_path, _config(upstream, sampled_policy, nodes))
        with pytest.raises(ConfigError, match=why):
            load_config(path)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_sampling_migration_goes_up_and_down(dialect: str, tmp_path: Path) -> None:
    name = f"cascade_sampling_{uuid.uuid4().hex[:12]}"
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:

        def columns() -> set[str]:
            engine = make_engine(url)
            try:
                return {c["name"] for c in inspect(engine).get_columns("ledger_calls")}
            finally:
                engine.dispose()

        assert upgrade(url, "0002") == "0002"
        assert not {"samples", "vote_share"} & columns()
        assert upgrade(url, "0003") == "0003"
        assert {"samples", "vote_share"} <= columns()
        assert downgrade(url, "0002") == "0002"
        assert not {"samples", "vote_share"} & columns()
    finally:
        if dialect == "postgresql":
            with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("sampling", ["n", "parallel"])
def test_collect_records_k_samples_per_model(
    upstream: str, sampled_policy: Path, tmp_path: Path, sampling: str
) -> None:
    """`cascade collect --samples 5` records the answer as before plus 4 samples per model,
    through the same backends (one more call with n: 4, or 4 parallel calls), and `fit`
    builds the sampled node from them; a bad k is refused with nothing written."""
    from typer.testing import CliRunner

    from cli.main import app

    up = httpx.Client(base_url=upstream, timeout=5.0)
    up.delete("/admin/faults").raise_for_status()
    up.delete("/admin/stats").raise_for_status()
    up.post("/admin/answers", json=[
        {"model": "small", "answer": "B", "confidence": -0.2, "samples": ["C", "B", "A", "B"]},
        {"model": "large", "answer": "B", "confidence": -0.01},
    ]).raise_for_status()  # fmt: skip
    config = write_config(
        tmp_path, _config(upstream, sampled_policy, ["small@5", "large"], sampling)
    )
    data = tmp_path / "data.jsonl"
    items = [
        {"id": f"q{i}", "messages": [{"role": "user", "content": QUESTION + " please" * i}],
         "reference": "B"}
        for i in range(3)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    out = tmp_path / "traces.jsonl"

    def collect(*extra: str):
        args = ["collect", "--config", str(config), "--cascade", "qa", "--dataset", str(data)]
        return CliRunner().invoke(
            app, [*args, "--out", str(out), *extra], env={"CASCADE_NO_PROGRESS": "1"}
        )

    for bad in ("0", "200"):
        got = collect("--samples", bad)
        assert got.exit_code == 2 and "k must be" in got.stderr and not out.exists()
    got = collect("--samples", "5", "--concurrency", "1")
    assert got.exit_code == 0, got.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert "samples" in row["models"]["large"]
        small = row["models"]["small"]
        assert len(small["samples"]) == 4 and set(small["samples"]) <= {"A", "B", "C"}
        assert small["tokens_out"] == 1  # the answer's own call, not its samples'
    stats = up.get("/admin/stats").json()["models"]
    assert stats["small"]["calls"] == (3 * 2 if sampling == "n" else 3 * 5)
    traces = add_sampled(load_traces(out), parse_samples("small@5"))
    assert "small@5" in traces.models


def test_an_explored_trace_row_holds_models_not_sampled_nodes() -> None:
    """Explored requests become trace rows with one entry per model: a sampled node's
    `n: k` call is left out (the same request calls its model alone), so every row of an
    explore file has the same models whatever the policy called."""
    from proxy.engine.cascade import CascadeRun, NodeCall
    from proxy.engine.exploration import trace_row
    from upstreams.base import CallResult

    def call(node: int, model: str, text: str) -> NodeCall:
        return NodeCall(node, model, CallResult(model=model, text=text), text, -0.1)

    run = CascadeRun(cascade="qa")
    run.calls = [call(0, "small@5", "B"), call(1, "large", "B"), call(2, "small", "C")]
    row = trace_row("r1", "qa", [{"role": "user", "content": QUESTION}], run, "large")
    assert row is not None and sorted(row["models"]) == ["large", "small"]
    assert row["models"]["small"]["answer"] == "C" and not row["models"]["small"]["correct"]


@pytest.mark.parametrize("sampling", ["n", "parallel"])
def test_explored_rows_carry_a_sampled_nodes_samples_and_fit_rebuilds_it(
    upstream: str, sampled_policy: Path, tmp_path: Path, sampling: str
) -> None:
    """With `small@5` in the cascade, every explored request samples `small` 4 more times
    (one `n: 4` call, or 4 parallel calls) whatever the policy called, and its trace row
    holds them as `samples`, so `cascade fit --samples 5` on the explore file rebuilds the
    sampled node: its vote over the row's answer and those samples."""
    from typer.testing import CliRunner

    from cli.main import app

    up = httpx.Client(base_url=upstream, timeout=5.0)
    up.delete("/admin/faults").raise_for_status()
    up.delete("/admin/stats").raise_for_status()
    up.post(
        "/admin/answers", json={"model": "large", "answer": "B", "confidence": -0.01}
    ).raise_for_status()
    # small's answers cycle (fake_upstream.py): the vote is B or C on even requests, and C
    # (wrong: large, the reference, says B) on odd ones
    cycles = [("B", ["C", "B", "A", "B"]), ("C", ["C", "A", "C", "B"])]
    config = _config(upstream, sampled_policy, ["small@5", "large"], sampling)
    config["cascades"]["qa"] |= {"explore_rate": 1.0, "explore_out": "explore.jsonl"}
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    n_requests = 10
    replies = []
    with running_proxy(write_config(tmp_path, config), env) as proxy:
        for i in range(n_requests):
            answer, samples = cycles[i % 2]
            small = {"model": "small", "answer": answer, "confidence": -0.01, "samples": samples}
            up.post("/admin/answers", json=small).raise_for_status()
            messages = [{"role": "user", "content": QUESTION + " please" * i}]
            replies.append(
                httpx.post(
                    f"{proxy.url}/v1/chat/completions",
                    json={"model": "qa", "messages": messages},
                    timeout=20.0,
                )
            )
    for reply in replies:
        assert reply.status_code == 200, reply.text
        calls = reply.json()["cascade"]["calls"]
        extra = [c for c in calls if c["decision"] == "explore:samples"]
        assert [c["model"] for c in extra] == (["small@4"] if sampling == "n" else ["small"] * 4)
    lines = (tmp_path / "explore.jsonl").read_text().splitlines()
    rows = {r["id"]: r for r in map(json.loads, lines)}
    assert sorted(rows) == sorted(r.headers["x-request-id"] for r in replies)
    for i, reply in enumerate(replies):
        row = rows[reply.headers["x-request-id"]]
        small = row["models"]["small"]
        assert len(small["samples"]) == 4 and set(small["samples"]) <= {"A", "B", "C"}
        assert small["answer"] in {"A", "B", "C"} and small["tokens_out"] == 1  # one call's
        assert "samples" not in row["models"]["large"] and "small@5" not in row["models"]
        if sampling == "n":  # the fake's n: 4 choices are the first 4 of its cycle
            answer, samples = cycles[i % 2]
            assert small["samples"] == [answer, *samples[:3]]
    stats = up.get("/admin/stats").json()["models"]
    per_request = 2 if sampling == "n" else 5  # the answer's call and the samples' call(s)
    assert stats["small"]["calls"] >= n_requests * per_request

    # the fit rebuilds small@5 from each row's answer and its first 4 samples
    traces = add_sampled(load_traces(tmp_path / "explore.jsonl"), parse_samples("5"))
    assert "small@5" in traces.models
    j, s = traces.models.index("small"), traces.models.index("small@5")
    for i, row_id in enumerate(traces.ids):
        small = rows[row_id]["models"]["small"]
        voted = majority([small["answer"], *small["samples"]])
        assert voted is not None
        assert traces.extracted[i][s] == [small["answer"], *small["samples"]][voted.index]
        assert traces.correct[i, s] == (traces.extracted[i][s] == "B")
    assert traces.correct[:, s].any() and not traces.correct[:, s].all()
    assert (traces.cost_usd[:, s] > traces.cost_usd[:, j]).all()  # the samples' tokens count
    policy = tmp_path / "refit.json"
    fit = CliRunner().invoke(
        app,
        ["fit", "--train", str(tmp_path / "explore.jsonl"), "--samples", "5",
         "--models", "small@5,large", "--transitions", "line", "--lambda", "0.5",
         "--out", str(policy)],
        env={"CASCADE_NO_PROGRESS": "1"},
    )  # fmt: skip
    assert fit.exit_code == 0, fit.output
    assert load_artifact(policy).models == ["small@5", "large"]
