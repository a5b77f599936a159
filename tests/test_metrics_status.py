"""`cascade_requests_total` counts each cascade request under the HTTP status its client got,
read from the /metrics of a real `cascade serve` process (issue 15, item 5)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from tests.serving import (
    QUESTION,
    db_upgrade,
    running_proxy,
    sqlite_env,
    upstream_admin,
    write_config,
)
from tests.synthetic import PRICES


def _counts(metrics: str) -> dict[tuple[str, str], float]:
    pattern = r'^cascade_requests_total\{cascade="([^"]+)",status="(\d+)"\} ([0-9.e+]+)$'
    return {(c, s): float(v) for c, s, v in re.findall(pattern, metrics, re.MULTILINE)}


def test_request_counts_carry_the_status_the_client_got(
    upstream: str, policy: Path, synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    fake = {"backend": "openai", "base_url": f"{upstream}/v1", "timeout_s": 30.0,
            "max_retries": 0, "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0}  # fmt: skip
    price_in, price_out = PRICES["medium"]
    recorded = {"backend": "replay", "model": "medium",
                "traces": [str(synthetic[0])],
                "price_in_per_mtok": price_in, "price_out_per_mtok": price_out}  # fmt: skip
    config = {
        "models": {"small": fake, "large": fake, "recorded": recorded},
        "cascades": {
            "qa": {"nodes": ["small", "large"], "reference": "large", "policy": str(policy)},
            "rec": {"nodes": ["recorded"], "reference": "recorded"},
        },
        "server": {"request_timeout_s": 1.0},
    }
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    ask = {"messages": [{"role": "user", "content": QUESTION}]}
    got: list[tuple[str, int | str]] = []
    with (
        running_proxy(write_config(tmp_path, config), env) as proxy,
        upstream_admin(upstream) as up,
    ):
        url = f"{proxy.url}/v1/chat/completions"

        def send(model: str, timeout: float = 15.0, **extra) -> None:
            try:
                reply = httpx.post(url, json={"model": model, **ask, **extra}, timeout=timeout)
            except httpx.TimeoutException:
                got.append((model, "gone"))
                return
            got.append((model, reply.status_code))

        send("qa")  # 200
        send("rec")  # 400 prompt_not_recorded: no trace holds this prompt
        send("qa", cascade={"max_cost_usd": 1e-12})  # 400 budget_too_small
        up.post("/admin/faults", json={"error_rate": 1.0, "count": 2}).raise_for_status()
        send("qa")  # 502: both models fail
        up.post("/admin/faults", json={"latency_ms": 4000, "count": 1}).raise_for_status()
        send("qa")  # 504: past the 1 s request timeout
        up.post("/admin/faults", json={"latency_ms": 4000, "count": 1}).raise_for_status()
        send("qa", timeout=0.3)  # the client hangs up: 499
        time.sleep(1.0)
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=5.0).text
    assert got == [("qa", 200), ("rec", 400), ("qa", 400), ("qa", 502), ("qa", 504), ("qa", "gone")]
    counts = _counts(metrics)
    assert counts == {
        ("qa", "200"): 1.0,
        ("qa", "400"): 1.0,
        ("qa", "499"): 1.0,
        ("qa", "502"): 1.0,
        ("qa", "504"): 1.0,
        ("rec", "400"): 1.0,
    }, counts
