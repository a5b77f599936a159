"""Issue 5's loop end to end on 127.0.0.1, each step by its console command: collect traces
from an OpenAI-compatible upstream (answering with the synthetic traces' recorded outputs,
tests/synthetic.py), fit to an
accuracy target and to a cost cap, serve the first policy, swap in the second under load
(no failed request), and find the new hash in the ledger."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.serving import CASCADE, REPO, db_upgrade, running_proxy, sqlite_env
from tests.synthetic import PRICES


def _cascade(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(CASCADE), *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert done.returncode == 0, done.stderr
    return done


def test_collect_fit_to_a_target_serve_and_reload_under_load(
    traces_upstream: str, synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in synthetic[0].read_text().split("\n") if line]
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": r["id"], "messages": r["messages"], "reference": r["reference"]})
            + "\n"
            for r in rows
        )
    )
    models = "\n".join(
        f"  {name}: {{backend: openai, base_url: '{traces_upstream}/v1', max_retries: 0, "
        f"price_in_per_mtok: {pin}, price_out_per_mtok: {pout}}}"
        for name, (pin, pout) in ((m, PRICES[m]) for m in ("large", "small", "big"))
    )  # listed out of price order on purpose
    cascade = "{nodes: [small, big, large], reference: large"
    config = tmp_path / "cascade.yaml"
    config.write_text(
        f"models:\n{models}\ncascades:\n  mc: {cascade}, policy: policy.json}}\n"
        "server: {admin_key_env: LOOP_ADMIN, policy_watch_s: 0}\n"
    )
    traces = tmp_path / "traces.jsonl"
    _cascade("collect", "--config", str(config), "--cascade", "mc", "--dataset", str(data),
             "--out", str(traces), "--concurrency", "8")  # fmt: skip
    assert len([x for x in traces.read_text().split("\n") if x]) == len(rows)

    accurate, cheap = tmp_path / "accurate.json", tmp_path / "cheap.json"
    fit = _cascade(
        "fit", "--train", str(traces), "--target-accuracy", "0.97", "--out", str(accurate)
    )
    assert "expected on train" in fit.stdout and "lambda" in fit.stdout
    art = json.loads(accurate.read_text())
    assert art["training"]["target"]["target_accuracy"] == 0.97
    low, high = art["expected"]["accuracy_95"]
    assert low <= art["expected"]["accuracy"] <= high
    budget = 0.5 * art["expected"]["mean_cost_usd"]
    _cascade("fit", "--train", str(traces), "--max-cost-usd", f"{budget:.10f}", "--out", str(cheap))
    cheap_art = json.loads(cheap.read_text())
    assert cheap_art["expected"]["mean_cost_usd"] <= budget + 1e-12
    assert cheap_art["hash"] != art["hash"]

    shutil.copy(accurate, tmp_path / "policy.json")
    env = sqlite_env(tmp_path / "ledger.db", LOOP_ADMIN="sk-loop-admin")
    db_upgrade(env)
    replies: list[httpx.Response] = []
    stop = threading.Event()

    def load(url: str, offset: int) -> None:
        with httpx.Client(timeout=30.0) as client:
            k = offset
            while not stop.is_set():
                messages = rows[k % len(rows)]["messages"]
                replies.append(
                    client.post(
                        f"{url}/v1/chat/completions", json={"model": "mc", "messages": messages}
                    )
                )
                k += 3

    with running_proxy(config, env, stop_s=30) as proxy:  # SIGTERM at exit flushes the ledger
        threads = [threading.Thread(target=load, args=(proxy.url, i)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        shutil.copy(cheap, tmp_path / "policy.tmp")
        os.replace(tmp_path / "policy.tmp", tmp_path / "policy.json")
        reload = httpx.post(
            f"{proxy.url}/admin/reload",
            headers={"Authorization": "Bearer sk-loop-admin"},
            timeout=30,
        )
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert reload.status_code == 200, reload.text
    assert reload.json()["reloaded"]["mc"] == {
        "old_hash": art["hash"],
        "policy_hash": cheap_art["hash"],
    }
    assert len(replies) > 20 and {r.status_code for r in replies} == {200}
    hashes = [r.json()["cascade"]["policy_hash"] for r in replies]
    assert set(hashes) == {art["hash"], cheap_art["hash"]}
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        ledgered = dict(db.execute("SELECT request_id, policy_hash FROM ledger_requests"))
    assert ledgered == {r.headers["x-request-id"]: h for r, h in zip(replies, hashes, strict=True)}
