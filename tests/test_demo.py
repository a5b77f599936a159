"""`cascade demo`: the README's main job on embedded defaults, as a real process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import openai
import pytest

from proxy import demo
from tests.serving import CASCADE, free_port, wait_ready


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


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen(
        [str(CASCADE), "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path_factory.mktemp("demo"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/health", proc, seconds=90)
    yield url
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert "curl -s" in out and "from openai import OpenAI" in out  # the printed examples


def test_the_demo_answers_test_questions_and_refuses_others(demo_server: str) -> None:
    client = openai.OpenAI(base_url=f"{demo_server}/v1", api_key="unused", max_retries=0)
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
