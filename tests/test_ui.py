"""The dashboard at /ui in a real browser: a proxy on PostgreSQL answers requests, then
headless Chromium (Debian's `chromium`, driven over the DevTools protocol) signs in with the
admin key and reads the page: no console errors, the spend shown equals the ledger's, a
known request's trace is there, and each call shows the token-logprob summary the ledger holds
for it (none for an upstream without logprobs). A screenshot goes to docs/dashboard.png.

In CI (CASCADE_CI=1) a missing Chromium fails the test; elsewhere it skips saying so."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.serving import CASCADE, db_upgrade, fake_upstream, running_proxy, write_config
from tests.test_ledger import pg_db  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]
ADMIN = "sk-admin-ui-test"
# the README's screenshot is written with CASCADE_UI_SCREENSHOT=1; else to a temporary folder
SCREENSHOT = REPO / "docs" / "dashboard.png"


SKY = "describe the sky"
SKY_LOGPROBS = [-0.02, -0.4, -7.25, -0.125, -1.5, -0.05]
# mean, minimum, 5% and 25% nearest-rank quantiles (of 6: the 1st and 2nd lowest)
SKY_SUMMARY = (sum(SKY_LOGPROBS) / 6, -7.25, -7.25, -1.5)


def _logprob_line(summary: list[float]) -> str:
    """The dashboard's line for a call's (mean, min, q05, q25): three significant digits."""
    parts = zip(("mean", "min", "q05", "q25"), summary, strict=True)
    return "logprobs: " + " · ".join(f"{k} {v:.3g}" for k, v in parts)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CASCADE_CI", "") not in ("", "0"):
        pytest.fail("chromium is not installed; CASCADE_CI is set: the browser test must run")
    pytest.skip("chromium not installed (apt-get install -y chromium; CI installs it)")


class Browser:
    """One headless Chromium page over the DevTools protocol: navigate, evaluate, capture,
    and every console error and uncaught exception it reported."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.errors: list[str] = []
        self.loaded = asyncio.Event()

    async def call(self, method: str, **params):
        self.next_id += 1
        mine = self.next_id
        await self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(json.dumps(params.get("args")))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params.get("exceptionDetails")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(params["entry"].get("text", ""))
        elif method == "Page.loadEventFired":
            self.loaded.set()

    async def goto_and_wait(self, action) -> None:
        self.loaded.clear()
        await action
        deadline = time.monotonic() + 30
        while not self.loaded.is_set():
            assert time.monotonic() < deadline, "page did not load"
            try:
                msg = json.loads(await asyncio.wait_for(self.ws.recv(), 1))
                self._event(msg)
            except TimeoutError:
                pass

    async def eval(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")


def _shrink(png: Path) -> None:
    """64 colours are plenty for the page: a third of the bytes in the repository."""
    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(png, optimize=True)


async def _drive(chromium: str, url: str, request_ids: list[str], shot: Path) -> dict:
    import websockets

    profile = tempfile.mkdtemp(prefix="cascade-chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**26) as ws:
            b = Browser(ws)
            for domain in ("Page", "Runtime", "Log"):
                await b.call(f"{domain}.enable")
            await b.call(
                "Emulation.setDeviceMetricsOverride", width=1200, height=1500,
                deviceScaleFactor=1, mobile=False,
            )  # fmt: skip
            await b.goto_and_wait(b.call("Page.navigate", url=f"{url}/ui"))
            assert await b.eval("!!document.querySelector('form[action=\"/ui/login\"]')")
            b.errors.clear()  # the sign-in page's own 401 is the expected answer
            await b.goto_and_wait(
                b.eval(
                    f"document.querySelector('input[name=key]').value = {json.dumps(ADMIN)};"
                    "document.querySelector('form').submit(); true"
                )
            )
            out = {
                "spend": await b.eval("document.getElementById('total-spend')?.textContent"),
                "traces": {
                    rid: await b.eval(f"document.getElementById('req-{rid}')?.textContent || null")
                    for rid in request_ids
                },
                "charts": await b.eval("document.querySelectorAll('svg.chart').length"),
                "budget": await b.eval("document.getElementById('budgets').textContent"),
            }
            shot.parent.mkdir(parents=True, exist_ok=True)
            png = await b.call("Page.captureScreenshot", format="png")
            shot.write_bytes(base64.b64decode(png["data"]))
            _shrink(shot)
            out["errors"] = list(b.errors)
            return out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_in_headless_chromium(pg_db, policy, tmp_path):  # noqa: F811
    chromium = _chromium()
    dbname, url = pg_db
    env = {**os.environ, "CASCADE_DATABASE_URL": url, "UI_TEST_ADMIN": ADMIN}
    db_upgrade(env)
    secrets = {}
    for name, *limits in (("team-a", "--budget-usd", "50"), ("team-b", "--budget-usd", "20")):
        made = subprocess.run(
            [str(CASCADE), "keys", "create", "--name", name, *limits],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        secrets[name] = made.stdout.strip().splitlines()[-1]
    with fake_upstream("small,large,plain") as up:
        price = {"price_in_per_mtok": 30.0, "price_out_per_mtok": 60.0}
        config = write_config(
            tmp_path,
            {
                "models": {
                    "small": {"backend": "openai", "base_url": f"{up.url}/v1", **price},
                    "large": {"backend": "openai", "base_url": f"{up.url}/v1",
                              "price_in_per_mtok": 600.0, "price_out_per_mtok": 1200.0},
                    # an upstream that sends no logprobs: its calls have no summary
                    "plain": {"backend": "openai", "base_url": f"{up.url}/v1", **price,
                              "logprobs": False},
                },
                "cascades": {
                    "qa": {"nodes": ["small", "large"], "reference": "large",
                           "policy": str(policy)},
                },
                "server": {"database_keys": True, "admin_key_env": "UI_TEST_ADMIN"},
            },
        )  # fmt: skip
        with running_proxy(config, env, cwd=tmp_path, ready_s=90) as proxy:
            ids = []
            for i in range(8):
                confident = i % 2 == 0  # a confident small model answers alone; else escalate
                small = ("B", -0.01) if confident else ("C", -2.5)
                for model, (text, confidence) in (("small", small), ("large", ("B", -0.05))):
                    httpx.post(
                        f"{up.url}/admin/answers",
                        json={"model": model, "answer": text, "confidence": confidence},
                    ).raise_for_status()
                reply = httpx.post(
                    f"{proxy.url}/v1/chat/completions",
                    json={"model": "qa", "messages": [{"role": "user", "content": f"q {i}"}]},
                    headers={"Authorization": f"Bearer {secrets['team-a' if i < 5 else 'team-b']}"},
                    timeout=30,
                )
                assert reply.status_code == 200, reply.text
                ids.append(reply.headers["x-request-id"])
            # straight to one model: an answer of six tokens with known logprobs, then the
            # upstream without logprobs
            httpx.post(
                f"{up.url}/admin/answers",
                json={"model": "small", "prompt": SKY, "answer": "clear blue sky with few clouds",
                      "token_logprobs": SKY_LOGPROBS},
            ).raise_for_status()  # fmt: skip
            for model, prompt in (("small", SKY), ("plain", "q plain")):
                reply = httpx.post(
                    f"{proxy.url}/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": prompt}]},
                    headers={"Authorization": f"Bearer {secrets['team-b']}"},
                    timeout=30,
                )
                assert reply.status_code == 200, reply.text
                ids.append(reply.headers["x-request-id"])
            deadline = time.monotonic() + 20  # the writer flushes every 0.25 s
            with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={dbname}") as conn:
                while True:
                    n, spend = conn.execute(
                        "SELECT count(*), sum(cost_usd) FROM ledger_requests"
                    ).fetchone()
                    if n == len(ids) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                shown = (ids[1], ids[-2], ids[-1])  # escalated; known logprobs; none
                lp = {
                    rid: conn.execute(
                        "SELECT model, lp_mean, lp_min, lp_q05, lp_q25 FROM ledger_calls "
                        "WHERE request_id = %s ORDER BY call_order",
                        (rid,),
                    ).fetchall()
                    for rid in shown
                }
            assert n == len(ids)
            assert [c[0] for c in lp[ids[1]]] == ["small", "large"]  # the known one escalated
            assert len(lp[ids[-2]]) == 1 and lp[ids[-2]][0][0] == "small", lp[ids[-2]]
            assert lp[ids[-2]][0][1:] == pytest.approx(SKY_SUMMARY), lp[ids[-2]]
            assert lp[ids[-1]] == [("plain", None, None, None, None)]
            shot = SCREENSHOT if os.environ.get("CASCADE_UI_SCREENSHOT") else tmp_path / "ui.png"
            page = asyncio.run(_drive(chromium, proxy.url, list(shown), shot))
    assert page["errors"] == [], page["errors"]
    assert page["spend"] == f"${spend:,.6f}", (page["spend"], spend)
    trace = page["traces"][ids[1]]
    assert trace and "team-a" in trace and "small" in trace and "large" in trace, trace
    for rid in shown[:2]:  # every call's summary, as the ledger holds it
        for _, *summary in lp[rid]:
            assert _logprob_line(summary) in page["traces"][rid], (summary, page["traces"][rid])
    assert "logprobs: mean -1.56 · min -7.25 · q05 -7.25 · q25 -1.5" in page["traces"][ids[-2]]
    assert "plain" in page["traces"][ids[-1]] and "logprobs" not in page["traces"][ids[-1]]
    assert page["charts"] == 3
    assert "team-a" in page["budget"] and "$50" in page["budget"] and "team-b" in page["budget"]
    assert 10_000 < shot.stat().st_size < 150_000


def test_ui_needs_the_admin_key_or_its_session_cookie(tmp_path):
    """Without the admin key: the sign-in form (401); a wrong key changes nothing; the right
    one sets a session cookie that opens the page, as does the admin key as a bearer; a
    client key does not open it."""
    env = {**os.environ, "CASCADE_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}",
           "UI_TEST_ADMIN": ADMIN}  # fmt: skip
    db_upgrade(env)
    config = write_config(
        tmp_path,
        {
            "models": {"small": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "server": {"admin_key_env": "UI_TEST_ADMIN", "api_keys": ["sk-client"]},
        },
    )
    with running_proxy(config, env, cwd=tmp_path) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=30) as client:
            first = client.get("/ui")
            assert first.status_code == 401 and 'action="/ui/login"' in first.text
            wrong = client.post("/ui/login", data={"key": "sk-client"})
            assert wrong.status_code == 401 and "not the admin key" in wrong.text
            assert "cascade_ui" not in client.cookies
            right = client.post("/ui/login", data={"key": ADMIN})
            assert right.status_code == 303 and right.headers["location"] == "/ui"
            page = client.get("/ui?days=30")
            assert page.status_code == 200 and 'id="total-spend"' in page.text
            assert "no requests in the window" in page.text
            client.get("/ui/logout")
            assert client.get("/ui").status_code == 401
        bearer = httpx.get(f"{proxy.url}/ui", headers={"Authorization": f"Bearer {ADMIN}"})
        assert bearer.status_code == 200 and 'id="total-spend"' in bearer.text
        client_key = httpx.get(f"{proxy.url}/ui", headers={"Authorization": "Bearer sk-client"})
        assert client_key.status_code == 401
        forged = httpx.get(f"{proxy.url}/ui", cookies={"cascade_ui": "0" * 64})
        assert forged.status_code == 401


def test_signals_cell_of_a_sampled_call_and_of_none():
    """A sampled node's votes get their own line beside the logprobs; a call with no signal
    shows n/a; a -9999 floor logprob and -0.0 read plainly."""
    from proxy.http.ui import _signals

    call = {"samples": 3, "vote_share": 2 / 3, "agreement": True, "lp_mean": -0.0,
            "lp_min": -9999.0, "lp_q05": -12.345, "lp_q25": -0.00123}  # fmt: skip
    cell = _signals(call)
    assert "<div>logprobs: mean 0 · min -9999 · q05 -12.3 · q25 -0.00123</div>" in cell, cell
    assert "<div>votes: 3 samples · share 0.667 · agrees with its tier</div>" in cell, cell
    bare = dict.fromkeys(call)
    assert _signals(bare) == '<td class="na">n/a</td>'
    assert "differs from its tier" in _signals({**bare, "agreement": False})
