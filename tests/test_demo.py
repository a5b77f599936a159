"""`cascade demo`: the README's main job on embedded defaults, as a real process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from proxy import demo
from tests.serving import CASCADE, free_port


def _test_row(i: int) -> dict:
    with demo.TEST.open() as f:
        for k, line in enumerate(f):
            if k == i:
                return json.loads(line)
    raise IndexError(i)


def test_the_shipped_traces_carry_their_licence_and_notice() -> None:
    assert demo.TRAIN.is_file() and demo.TEST.is_file()
    assert "Apache License" in (demo.HERE / "LICENSE-RouteLLM").read_text()
    notice = (Path(__file__).resolve().parents[1] / "NOTICE").read_text()
    assert "lm-sys/RouteLLM" in notice and "gsm8k-routellm" in notice


def test_ask_prints_the_cascade_trace(tmp_path: Path) -> None:
    row = _test_row(3)
    res = subprocess.run(
        [str(CASCADE), "demo", "--ask", row["messages"][-1]["content"]],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert demo.SMALL in res.stdout and "returned:" in res.stdout
    assert "total cost: $" in res.stdout
    returned = res.stdout.split("returned: ")[1].split("'s answer")[0]
    assert row["models"][returned]["answer"].strip()[:40] in res.stdout.replace("\n", " ")


def test_ask_with_an_unrecorded_question_is_a_clear_error(tmp_path: Path) -> None:
    res = subprocess.run(
        [str(CASCADE), "demo", "--ask", "What is the capital of France?"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 2
    assert "not among the recorded ones" in res.stderr
    assert demo.TEST.name in res.stderr


@dataclass
class Demo:
    url: str
    folder: Path
    banner: list[str]  # what it printed before its examples


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[Demo]:
    port = free_port()
    folder = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    proc = subprocess.Popen(
        [str(CASCADE), "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=folder, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    banner = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (banner and banner[-1].startswith("curl:")):
            line = proc.stdout.readline()
            assert line, f"the demo ended without its examples: {banner}"
            banner.append(line.rstrip("\n"))
        # the examples come once the server answers: at once, not after a retry
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        yield Demo(url, folder, banner)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    rest = proc.stdout.read()  # (through the reader: part of it may be in its buffer)
    proc.stdout.close()
    assert "curl -s" in rest and "from openai import OpenAI" in rest  # the printed examples


def test_the_banner_says_where_the_ledger_is_and_how_to_trade_cost(demo_server: Demo) -> None:
    text = "\n".join(demo_server.banner)
    ledger = f"sqlite:///{demo_server.folder / 'cascade.db'}"
    assert f"ledger: {ledger}" in text
    assert f"cascade report spend --database-url {ledger}" in text
    assert re.search(r"lambda 0\.\d{3} \(the cheapest setting reaching 80% of", text)
    assert '"cascade": {"lambda": 0.99}' in text


def test_every_demo_start_fits_the_same_policy_hash(demo_server: Demo, tmp_path: Path) -> None:
    served = re.search(r"policy (sha256:[0-9a-f]{12})", demo_server.banner[0]).group(1)
    res = subprocess.run(
        [str(CASCADE), "demo", "--ask", _test_row(3)["messages"][-1]["content"]],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"(policy {served})" in res.stdout  # fitted again, seconds later: the same hash


def test_the_demo_answers_test_questions_and_refuses_others(demo_server: Demo) -> None:
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="unused", max_retries=0)
    row = _test_row(0)
    reply = client.chat.completions.create(model=demo.CASCADE, messages=row["messages"])
    assert reply.model in (demo.SMALL, demo.LARGE)
    assert reply.choices[0].message.content == row["models"][reply.model]["answer"]
    extra = reply.model_extra["cascade"]
    assert extra["calls"][0]["model"] == demo.SMALL
    assert extra["cost_usd"] > 0 and extra["reference_cost_usd"] > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=demo.CASCADE, messages=[{"role": "user", "content": "hello?"}]
        )
    assert err.value.response.json()["error"]["code"] == "prompt_not_recorded"
