"""`cascade serve` and `cascade demo`: the proxy on a socket bound first, so that a busy port
is refused at once, before anything slow loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.app import app, console, fail, load_with_costs

if TYPE_CHECKING:
    from policies.artifact import PolicyArtifact


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option(help="Cascade config (YAML); default: $CASCADE_CONFIG.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes sharing the port (uvicorn workers), each with its own "
            "ledger writer and spool file; about one per core.",
        ),
    ] = 1,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log every HTTP request (uvicorn's access log).")
    ] = False,
) -> None:
    """Run the OpenAI-compatible proxy: POST /v1/chat/completions with a cascade or model name.

    Also serves GET /v1/models, GET /health and GET /metrics (Prometheus; per worker process).
    Logs to stderr one line at start (address, cascades and their policies, database, spool),
    one per policy reload and one at shutdown.
    """
    sock = _listen(host, port)  # first: a busy port is an error at once, before any loading
    from proxy.config import load_config

    cfg = load_config(config)
    state = _build_state(cfg)  # with --workers too: a bad config fails here, once
    if workers > 1:
        del state  # each worker builds its own from the same file
        path = config if config is not None else Path(os.environ["CASCADE_CONFIG"])
        _run_server(
            None, sock, host, workers=workers, config_path=path.resolve(), access_log=access_log
        )
        return
    _run_server(state, sock, host, access_log=access_log)


def _build_state(cfg):
    from proxy.http.state import build_state

    return build_state(cfg)


LISTEN_BACKLOG = 2048  # uvicorn's default


def _listen(host: str, port: int):
    """A socket listening on host:port, bound as uvicorn binds (SO_REUSEADDR: a restart right
    after a crash is not refused while the old connections linger in TIME_WAIT). Bound here,
    before anything slow loads, so a busy port is an error within a second, and handed to
    uvicorn as it is, so nothing can take the port between this check and serving."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail(f"cannot listen: port {port} on {host} is in use (choose another with --port)")
        if exc.errno == errno.EACCES:
            fail(f"cannot listen on {host}:{port}: permission denied (a port below 1024?)")
        if exc.errno == errno.EADDRNOTAVAIL:
            fail(f"cannot listen on {host}:{port}: {host} is not an address of this machine")
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.set_inheritable(True)  # for uvicorn's worker processes
    return sock


def _address(host: str, sock) -> str:
    port = sock.getsockname()[1]  # the real one, also for --port 0
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_config(access_log: bool) -> dict:
    """uvicorn's logging, quieter (its own start-up lines are replaced by cascade's), with the
    `cascade` logger's lines (start, reloads, shutdown) and the access log on stderr. Given to
    uvicorn, so that every worker process configures it too."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["cascade"] = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    config["formatters"]["access"]["fmt"] = (
        '%(asctime)s %(levelname)s access: %(client_addr)s "%(request_line)s" %(status_code)s'
    )
    config["handlers"]["cascade"] = {
        "class": "logging.StreamHandler",
        "formatter": "cascade",
        "stream": "ext://sys.stderr",
    }
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config["loggers"]["uvicorn.error"] = {"level": "WARNING"}
    config["loggers"]["uvicorn.access"]["level"] = "INFO" if access_log else "WARNING"
    config["loggers"]["cascade"] = {"handlers": ["cascade"], "level": "INFO", "propagate": False}
    return config


def _run_server(
    state,
    sock,
    host: str,
    workers: int = 1,
    config_path: Path | None = None,
    access_log: bool = False,
    on_started=None,
) -> None:
    """Serve `state` on the listening socket `sock` in this process (`on_started()` once it
    serves); or, with workers > 1, spawn uvicorn workers sharing `sock` that each build
    their state from `config_path` (handed over as $CASCADE_CONFIG)."""
    import uvicorn

    from proxy.http.announce import LISTEN_ENV
    from proxy.http.app import create_app

    port = sock.getsockname()[1]
    os.environ[LISTEN_ENV] = _address(host, sock)  # for the start line, workers' too
    options = {
        "host": host,
        "port": port,
        "log_config": _log_config(access_log),
        "log_level": None,
        "access_log": access_log,
    }
    try:
        if workers > 1:
            import tempfile

            from proxy.engine.reload import RELOAD_SIGNAL_ENV

            os.environ["CASCADE_CONFIG"] = str(config_path)  # inherited by the spawned workers
            with tempfile.TemporaryDirectory(prefix="cascade-reload-") as shared:
                # POST /admin/reload reaches one worker; it bumps this file and the rest follow
                os.environ[RELOAD_SIGNAL_ENV] = str(Path(shared) / "reload")
                config = uvicorn.Config(
                    "proxy.http.app:create_app_from_env", factory=True, workers=workers, **options
                )
                _supervise(config, sock)
            return

        class Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)
                if self.started and on_started is not None:
                    on_started()

        server = Server(uvicorn.Config(create_app(state), **options))
        server.run(sockets=[sock])
        if not server.started:
            raise typer.Exit(code=3)  # uvicorn's start-up failure status; it said why
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def _supervise(config, sock) -> None:
    """uvicorn's supervisor of worker processes, on an already listening socket."""
    import inspect

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn before 0.30
        Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock]).run()
    else:
        Multiprocess(config, sockets=[sock]).run()


DEMO_TARGET = 0.8  # of gpt-4's accuracy: Mixtral answers most questions, some escalate


def _demo_state(policy_dir: Path):
    """Fit the demo policy on the shipped train traces, then build the proxy over them."""
    from calibration.artifact import build_artifact, choose_mu, save_artifact
    from calibration.fit import DEFAULT_MUS, FittedIndex
    from proxy import demo

    traces = load_with_costs(demo.TRAIN)
    fitted = FittedIndex(traces, recall=True)
    mu, target = choose_mu(
        fitted, lam=None, target_accuracy=DEMO_TARGET, max_cost_usd=None, mus=DEFAULT_MUS
    )
    art = build_artifact(
        fitted, mu, train_path=demo.TRAIN.name, answer_kind=traces.kind, target=target
    )
    path = policy_dir / "gsm8k-demo-policy.json"
    save_artifact(art, path)
    config = demo.demo_config(path)
    from proxy.ledger.db import upgrade

    upgrade(config.database_url)  # the demo's own SQLite ledger, in the working directory
    return _build_state(config), art


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port for the demo proxy.")] = 8080,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    ask: Annotated[
        str | None,
        typer.Option(help="Answer this one question and print the cascade trace, no server."),
    ] = None,
) -> None:
    """Serve a demo cascade on embedded defaults: no GPU, no API key, no database server.

    Two recorded models (Mixtral-8x7B-Instruct, gpt-4-1106-preview) answer GSM8K questions
    from the Apache-2.0 RouteLLM traces shipped in proxy/demo; the policy is fitted on the
    train part at start. Any question of the test part is answered; others get a clear error.
    Requests are ledgered in ./cascade.db (SQLite; $CASCADE_DATABASE_URL may name another).
    """
    import tempfile

    from proxy import demo as demo_data

    sock = _listen(host, port) if ask is None else None  # a busy port fails before the fit
    typer.echo("fitting the demo policy on the shipped GSM8K train traces ...", err=True)
    with tempfile.TemporaryDirectory(prefix="cascade-demo-") as tmp:
        state, art = _demo_state(Path(tmp))
        test = load_with_costs(demo_data.TEST)
        if sock is None:
            _ask(state, ask, test)
            return
        example = test.messages[0][-1]["content"]
        address, ledger = _address(host, sock), state.config.database_url

        def banner() -> None:  # once the server answers: never before a failure
            _print_demo_banner(address, example, art, ledger)

        _run_server(state, sock, host, on_started=banner)


def _ask(state, question: str, test) -> None:
    import asyncio

    from rich.table import Table

    from proxy import demo as demo_data
    from proxy.engine.cascade import Overrides

    engine = state.engines[demo_data.CASCADE]
    run = asyncio.run(engine.run([{"role": "user", "content": question}], {}, Overrides()))
    if run.answer is None:
        if all(c.result.error == "unknown_prompt" for c in run.calls):
            reasons = "the question is not among the recorded ones"
        else:
            reasons = "; ".join(f"{c.model}: {c.result.error}" for c in run.calls)
        examples = "\n  ".join(test.messages[i][-1]["content"][:100] for i in range(3))
        fail(
            f"no model could answer ({reasons}).\nThe demo answers the questions of "
            f"{demo_data.TEST.name}, for example:\n  {examples}"
        )
    table = Table(title=f"cascade {run.cascade} (policy {run.policy_hash[:19]})")
    for col in ("#", "model", "answer", "confidence", "p_correct", "cost_usd", "decision"):
        table.add_column(col, overflow="fold")
    for i, c in enumerate(run.calls, 1):
        table.add_row(
            str(i),
            c.model,
            str(c.extracted),
            "n/a" if c.confidence is None else f"{c.confidence:.3f}",
            "n/a" if c.p_correct is None else f"{c.p_correct:.3f}",
            "n/a" if c.result.cost_usd is None else f"${c.result.cost_usd:.6f}",
            c.decision,
        )
    out = console()
    out.print(table)
    last = run.calls[-1] is run.answer
    why = "the last model called" if last else "recalled: the most likely right of those called"
    out.print(f"returned: {run.answer.model}'s answer ({why}); stop reason: {run.reason}")
    total = run.cost_usd
    out.print(f"total cost: {'unknown' if total is None else f'${total:.6f}'}")
    out.print(run.answer.result.text)


def _print_demo_banner(url: str, example: str, art: PolicyArtifact, database_url: str) -> None:
    from proxy import demo as demo_data
    from proxy.ledger.db import safe_url, sqlite_file

    path = sqlite_file(database_url)
    ledger = safe_url(database_url) if path is None else f"sqlite:///{path.resolve()}"
    body = json.dumps(
        {"model": demo_data.CASCADE, "messages": [{"role": "user", "content": example}]}
    )
    quoted = "'" + body.replace("'", "'\\''") + "'"
    exp = art.expected
    ref_acc = art.training.reference_accuracy or float("nan")
    lines = [
        f"cascade demo: policy {art.hash[:19]}, nodes {' -> '.join(art.models)}",
        f"expected (train, out-of-fold): accuracy {exp.accuracy:.3f} against "
        f"{ref_acc:.3f} for {art.reference_model} alone, at "
        f"{exp.cost_fraction:.2f} of its cost; {exp.calls_per_query:.2f} calls per question",
        f"lambda {art.lam:.3f} (the cheapest setting reaching {DEMO_TARGET:.0%} of "
        f'{art.reference_model}\'s accuracy on train); per request, "cascade": '
        '{"lambda": 0.99} buys accuracy, {"max_cost_usd": 0.001} caps the cost',
        f"ledger: {ledger}  (from any folder: cascade report spend --database-url {ledger})",
        f"serving on {url}  (Ctrl-C to stop); it answers the questions of {demo_data.TEST.name}",
        "",
        "curl:",
        f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d {quoted}",
        "",
        "openai (Python):",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{url}/v1", api_key="unused")',
        f'  r = client.chat.completions.create(model="{demo_data.CASCADE}",',
        f'      messages=[{{"role": "user", "content": {json.dumps(example)}}}])',
        "  print(r.model, r.choices[0].message.content, r.model_extra['cascade'])",
    ]
    typer.echo("\n".join(lines))
