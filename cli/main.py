"""The `cascade` command line: fit a policy, evaluate it, benchmark every policy on traces.

Bad input (a corrupt trace file, a missing artifact, conflicting options) prints one clear
`error:` message and exits with status 2; nothing is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="cascade",
    help=(
        "cascade: an OpenAI-compatible LLM cascade router. It tries cheap models first and a "
        "calibrated dynamic-index policy (T-Tamer, with recall) decides when to stop or which "
        "bigger model to pay for, returning the best answer seen. These commands fit that "
        "policy on recorded traces, evaluate it, and benchmark it against the baselines."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_TRACES = Path("../shared/data/traces")


PIPE_WIDTH = 100_000  # columns of a table written to a pipe or file: never wrapped


def _console(stderr: bool = False):
    """A rich console for tables: the terminal's width on a terminal; on a pipe or file as
    wide as the table, so that no cell is folded at rich's default of 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPE_WIDTH)


def fail(message: str) -> None:
    """Print one clear error line and exit 2 (bad input; nothing was written)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _input_errors() -> tuple[type[Exception], ...]:
    from calibration.artifact import ArtifactError
    from calibration.pricing import PricingError
    from calibration.traces import TraceError

    return (TraceError, ArtifactError, PricingError, ValueError, FileNotFoundError)


def _load_with_costs(path: Path):
    from calibration.pricing import fill_costs
    from calibration.traces import load_traces

    return fill_costs(load_traces(path))


@app.command()
def fit(
    train: Annotated[Path, typer.Option(help="Training traces (JSONL, DESIGN.md format).")],
    out: Annotated[Path, typer.Option(help="Where to write the policy artifact (JSON).")],
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated models to use as nodes (default: chosen on train)."),
    ] = None,
    lam: Annotated[
        float | None,
        typer.Option("--lambda", help="Weight of accuracy vs cost, in (0, 1]; 1 = ignore cost."),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        typer.Option(help="Cheapest policy reaching this fraction of the reference accuracy."),
    ] = None,
    max_cost_usd: Annotated[
        float | None,
        typer.Option(help="Most accurate policy whose mean cost per query is at most this."),
    ] = None,
    recall: Annotated[
        bool, typer.Option(help="Return the best answer explored (--no-recall: the last).")
    ] = True,
    transitions: Annotated[
        str,
        typer.Option(
            help="Allowed transitions: 'skips' (any node to any pricier one), 'line' (each "
            "node to the next), or edges such as 'start>small,small>large,start>large'."
        ),
    ] = "skips",
    bins: Annotated[
        int | None,
        typer.Option(min=2, max=50, help="Loss bins per node (default: chosen by CV on train)."),
    ] = None,
    tiers: Annotated[
        str | None,
        typer.Option(
            help="Tiers to offer as nodes, e.g. 'a+b+c,d+e': models called in parallel, "
            "answered by majority vote; each becomes node 'tier:a+b+c' (name it in --models "
            "or --transitions, or let node selection consider it)."
        ),
    ] = None,
) -> None:
    """Fit the index policy on training traces and write a versioned policy artifact.

    Give exactly one of --lambda, --target-accuracy, --max-cost-usd. Targets are met on the
    training traces with out-of-fold estimates; the artifact records the expected accuracy
    and cost with 95% bootstrap intervals.
    """
    try:
        from calibration.artifact import build_artifact, choose_mu, save_artifact
        from calibration.fit import DEFAULT_MUS, FittedIndex
        from policies.transitions import parse_spec_text

        if sum(x is not None for x in (lam, target_accuracy, max_cost_usd)) != 1:
            fail("give exactly one of --lambda, --target-accuracy, --max-cost-usd")
        if not out.parent.is_dir():
            fail(f"output folder {out.parent} does not exist")
        start = time.perf_counter()
        with _FitProgress() as shown:
            shown("reading traces", 0, 1)
            traces = _load_with_costs(train)
            if tiers:
                from calibration.tiers import add_tiers, parse_tiers

                traces = add_tiers(traces, parse_tiers(tiers))
            names = [m.strip() for m in models.split(",") if m.strip()] if models else None
            fitted = FittedIndex(
                traces,
                recall=recall,
                models=names,
                transitions=parse_spec_text(transitions),
                n_bins=bins,
                progress=shown,
            )
            mu, target = choose_mu(
                fitted,
                lam=lam,
                target_accuracy=target_accuracy,
                max_cost_usd=max_cost_usd,
                mus=DEFAULT_MUS,
                progress=shown,
            )
            art = build_artifact(
                fitted,
                mu,
                train_path=str(train),
                answer_kind=traces.kind,
                target=target,
                progress=shown,
            )
        save_artifact(art, out)
    except _input_errors() as exc:
        fail(str(exc))
    exp = art["expected"]
    nodes = " -> ".join(n["model"] for n in art["nodes"])
    typer.echo(f"wrote {out} ({art['hash'][:19]}) in {time.perf_counter() - start:.1f} s")
    typer.echo(f"nodes (cheapest first): {nodes}; transitions: {art['transitions']}")
    for warning in fitted.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"lambda {art['lambda']:.4f}; recall {'on' if art['recall'] else 'off'}")
    typer.echo(
        f"expected on train (out-of-fold): accuracy {exp['accuracy']:.3f} "
        f"[{exp['accuracy_95'][0]:.3f}, {exp['accuracy_95'][1]:.3f}], "
        f"cost {exp['cost_fraction']:.3f} x {art['reference_model']} "
        f"(${exp['mean_cost_usd']:.3g}/query), {exp['calls_per_query']:.2f} calls/query"
    )


@app.command()
def evaluate(
    policy: Annotated[Path, typer.Option(help="Policy artifact written by `cascade fit`.")],
    test: Annotated[Path, typer.Option(help="Traces to replay the policy on (JSONL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Replay a policy on traces: accuracy, cost, latency, calls, where queries stop."""
    try:
        from calibration.artifact import load_artifact
        from calibration.evaluate import evaluate_artifact

        art = load_artifact(policy)
        report = evaluate_artifact(art, _load_with_costs(test))
    except _input_errors() as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    from rich.table import Table

    table = Table(title=f"{policy} on {test}", show_header=False)
    rows = [
        ("policy", report["policy_hash"][:19]),
        ("rows", str(report["rows"])),
        ("accuracy", f"{report['accuracy']:.4f}"),
        (
            f"reference {report['reference_model']} accuracy",
            f"{report['reference_accuracy']:.4f}",
        ),
        ("mean cost per query", f"${report['mean_cost_usd']:.4g}"),
        ("cost / reference", f"{report['cost_fraction_of_reference']:.3f}"),
        (
            "mean latency",
            "n/a" if report["mean_latency_ms"] is None else f"{report['mean_latency_ms']:.0f} ms",
        ),
        ("calls per query", f"{report['calls_per_query']:.2f}"),
        ("stops at", ", ".join(f"{m} {v:.1%}" for m, v in report["stops_at"].items())),
        ("answer from", ", ".join(f"{m} {v:.1%}" for m, v in report["answer_from"].items())),
        ("answer not the last explored", f"{report['returned_not_last']:.1%}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    _console().print(table)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and NAME.png.")],
    traces: Annotated[
        Path, typer.Option(help="Folder of NAME-train.jsonl / NAME-test.jsonl pairs.")
    ] = DEFAULT_TRACES,
    only: Annotated[list[str] | None, typer.Option(help="Run only this pair (repeatable).")] = None,
) -> None:
    """Run the evaluation protocol on every train/test pair: fit on train, replay on test.

    Every policy (index, index-norecall, threshold, agreement, singles, each single model,
    the two oracles) is tuned on train only; the curves, costs to match the best model and
    areas under the curve are computed on test.

    A train file without its test file (or the reverse) is skipped with a message. A pair
    with a bad trace file, a model without a price or halves with different models is
    skipped with its reason (printed, and listed in bench.md and bench.json); the others
    still run. Exit status: 0 every complete pair ran, 1 some were skipped for bad input,
    2 nothing could run.

    Each pair's verdict (index AUC, the best baseline's, cost within a point) is printed as
    the pair finishes; on a terminal, bars show pairs and policies done and the time left.
    """
    try:
        from calibration.bench import find_pairs, run_bench, verdict

        pairs, skipped = find_pairs(traces)
        for message in skipped:
            typer.echo(message, err=True)
        n = len([p for p in pairs if not only or p.name in only])
        failed: list[str] = []
        with _BenchProgress(n) as shown:

            def skip(message: str) -> None:
                failed.append(message)
                shown.advance_pair()
                shown.warn(message)

            def done(result) -> None:
                shown.advance_pair()
                shown.say(verdict(result))  # as each pair finishes, not only at the end

            doc, _ = run_bench(
                traces,
                out,
                only=only,
                progress=shown.policy_done,
                on_skip=skip,
                on_pair=shown.pair_started,
                on_done=done,
            )
    except _input_errors() as exc:
        fail(str(exc))
    _print_bench_summary(doc, n - len(failed), out)
    if failed:
        typer.echo(f"{len(failed)} pair(s) could not be benchmarked (see above)", err=True)
        raise typer.Exit(code=1)


class _FitProgress:
    """`cascade fit`'s phases on a terminal (node selection, length calibration, the
    posterior, cross-validation of the bins, the lambda search, ...): the phase, its steps
    done and the time left. Nothing elsewhere (fit's output is its summary)."""

    def __init__(self) -> None:
        self.live = None
        self.task = None
        self.phase = ""
        if not _progress_shown():
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.live = Progress(
            SpinnerColumn(),
            TextColumn("fit: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=_console(stderr=True),
            transient=True,
        )

    def __enter__(self) -> _FitProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.live is None:
            return
        if phase != self.phase:
            if self.task is not None:
                self.live.update(self.task, completed=self.live.tasks[self.task].total)
            self.task = self.live.add_task(phase, total=total)
            self.phase = phase
        self.live.update(self.task, completed=done, total=total)


def _progress_shown() -> bool:
    """A live progress display: only on a terminal (stderr), unless CASCADE_NO_PROGRESS."""
    return sys.stderr.isatty() and not os.environ.get("CASCADE_NO_PROGRESS")


class _BenchProgress:
    """`cascade bench` as it runs. On a terminal: a bar of pairs done (with time left) and
    one of the current pair's policies done, and each pair's verdict above them as it
    finishes. Elsewhere: the verdict lines alone, one plain line per pair on stdout."""

    def __init__(self, n_pairs: int) -> None:
        self.live = None
        if not _progress_shown():
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.live = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=_console(stderr=True),
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.pairs = self.live.add_task("bench", total=n_pairs, unit="pairs")
        self.policies = self.live.add_task("", total=None, unit="policies", visible=False)
        self.pairs_done = 0
        self.n_policies = 1

    def __enter__(self) -> _BenchProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def pair_started(self, name: str, n_policies: int) -> None:
        if self.live is not None:
            self.n_policies = max(1, n_policies)
            self.live.reset(self.policies, total=n_policies, description=name, visible=True)

    def policy_done(self, name: str) -> None:
        if self.live is not None:
            self.live.advance(self.policies)
            # pairs advance by policies too: the time left is known before a pair ends
            policies = self.live.tasks[self.policies].completed
            done = self.pairs_done + min(policies / self.n_policies, 0.99)
            self.live.update(self.pairs, completed=done)

    def advance_pair(self) -> None:
        if self.live is not None:
            self.pairs_done += 1
            self.live.update(self.pairs, completed=self.pairs_done)

    def say(self, line: str) -> None:
        """A line for stdout; above the bars when both are the same terminal."""
        if self.live is not None and sys.stdout.isatty():
            self.live.console.print(line, markup=False, highlight=False)
        else:
            typer.echo(line)

    def warn(self, line: str) -> None:
        """A line for stderr, above the bars."""
        if self.live is not None:
            self.live.console.print(line, markup=False, highlight=False)
        else:
            typer.echo(line, err=True)


def _print_bench_summary(doc: dict, n_pairs: int, out: Path) -> None:
    from rich.table import Table

    summary = doc["summary"]
    table = Table(title=f"cascade bench: {n_pairs} pair(s), test split (means over pairs)")
    for col in ("policy", "auc", "cost_to_match_1pp", "acc@0.2", "acc@0.5"):
        table.add_column(col)
    for name, s in summary.items():
        if name.startswith("single:"):
            continue
        never = f" ({s['never_1pp']} never)" if s["never_1pp"] else ""
        table.add_row(
            name,
            f"{s['auc']:.4f}",
            f"{s['cost_to_match_1pp']:.3f}{never}",
            f"{s['acc_at_20']:.3f}",
            f"{s['acc_at_50']:.3f}",
        )
    _console().print(table)
    typer.echo(f"wrote {out / 'bench.md'}, {out / 'bench.json'} and one PNG per pair")


@app.command()
def collect(
    cascade: Annotated[str, typer.Option(help="Cascade whose models (nodes + reference) to call.")],
    dataset: Annotated[
        Path, typer.Option(help='JSONL items: {"id", "messages", "reference", "task"?}.')
    ],
    out: Annotated[Path, typer.Option(help="Trace JSONL to append to (existing ids skipped).")],
    config: Annotated[
        Path | None, typer.Option(help="Cascade config (YAML); default: $CASCADE_CONFIG.")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Items in flight at once.")] = 8,
    grader: Annotated[
        str | None,
        typer.Option(
            help="mc | numeric | exact | regex:PATTERN | judge:MODEL (default: from the data)."
        ),
    ] = None,
    max_cost_usd: Annotated[
        float | None, typer.Option(help="Stop starting items once this run would spend more.")
    ] = None,
) -> None:
    """Call every model of a cascade on a dataset and write full-information traces.

    Each item goes to every model; answers are graded and written with confidence, cost,
    latency and tokens in the trace format `cascade fit` reads. Resumable: run it again and
    only missing items are collected. Upstream failures are recorded in the rows.
    """
    import asyncio

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from calibration.collect import CollectError
    from calibration.collect import collect as run_collect
    from calibration.graders import GraderError
    from proxy.config import ConfigError, load_config

    progress = Progress(
        TextColumn("collect"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.2f} items/s  ${task.fields[spent]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=not sys.stderr.isatty(),
        disable=bool(os.environ.get("CASCADE_NO_PROGRESS")),
    )
    bar = {}

    def on_start(status, models: list[str]) -> None:
        typer.echo(f"models (cheapest first): {', '.join(models)}", err=True)
        bar["task"] = progress.add_task("collect", total=status.total, rate=0.0, spent=0.0)

    def on_row(status) -> None:
        progress.update(
            bar["task"],
            completed=status.written,
            rate=status.items_per_s,
            spent=status.cost_usd,
        )

    try:
        cfg = load_config(config)
        with progress:
            summary = asyncio.run(
                run_collect(
                    cfg,
                    cascade,
                    dataset,
                    out,
                    concurrency=concurrency,
                    grader=grader,
                    max_cost_usd=max_cost_usd,
                    on_start=on_start,
                    on_row=on_row,
                )
            )
    except (ConfigError, CollectError, GraderError, ValueError, OSError) as exc:
        fail(str(exc))  # ValueError: a replay model's bad trace file
    for note in summary.notes:
        typer.echo(f"note: {note}", err=True)
    s = summary
    typer.echo(
        f"wrote {s.written} row(s) to {s.out} in {s.elapsed_s:.1f} s "
        f"({s.already} already there, grader {s.grader}, answers as {s.kind})"
    )
    judge = f" (grading ${s.grader_cost_usd:.4f})" if s.grader_cost_usd else ""
    typer.echo(f"spent ${s.cost_usd:.4f} this run{judge}; ${s.prior_cost_usd:.4f} before")
    if s.failed_calls:
        failed = ", ".join(f"{m} {n}" for m, n in s.failed_calls.items())
        typer.echo(f"failed calls (recorded in the rows): {failed}")
    if s.ungraded:
        typer.echo(f"{len(s.ungraded)} item(s) not written: the judge gave no verdict; run again")
    if s.stopped_by_budget:
        typer.echo(
            f"stopped at the budget cap (--max-cost-usd {max_cost_usd}): {s.not_started} "
            "item(s) left; run again to continue"
        )


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
    from proxy.config import ConfigError, load_config
    from proxy.ledger.db import DatabaseUnavailable, SchemaError

    try:
        cfg = load_config(config)
        state = _build_state(cfg)  # with --workers too: a bad config fails here, once
    except (ConfigError, SchemaError, DatabaseUnavailable, ValueError, OSError) as exc:
        sock.close()
        fail(str(exc))
    if workers > 1:
        del state  # each worker builds its own from the same file
        path = config if config is not None else Path(os.environ["CASCADE_CONFIG"])
        _run_server(
            None, sock, host, workers=workers, config_path=path.resolve(), access_log=access_log
        )
        return
    _run_server(state, sock, host, access_log=access_log)


def _build_state(cfg):
    from proxy.http.app import build_state

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

    traces = _load_with_costs(demo.TRAIN)
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
        try:
            state, art = _demo_state(Path(tmp))
        except _input_errors() as exc:
            fail(str(exc))
        test = _load_with_costs(demo_data.TEST)
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
    console = _console()
    console.print(table)
    last = run.calls[-1] is run.answer
    why = "the last model called" if last else "recalled: the most likely right of those called"
    console.print(f"returned: {run.answer.model}'s answer ({why}); stop reason: {run.reason}")
    total = run.cost_usd
    console.print(f"total cost: {'unknown' if total is None else f'${total:.6f}'}")
    console.print(run.answer.result.text)


def _print_demo_banner(url: str, example: str, art: dict, database_url: str) -> None:
    from proxy import demo as demo_data
    from proxy.ledger.db import safe_url, sqlite_file

    path = sqlite_file(database_url)
    ledger = safe_url(database_url) if path is None else f"sqlite:///{path.resolve()}"
    body = json.dumps(
        {"model": demo_data.CASCADE, "messages": [{"role": "user", "content": example}]}
    )
    quoted = "'" + body.replace("'", "'\\''") + "'"
    nodes = " -> ".join(n["model"] for n in art["nodes"])
    exp = art["expected"]
    lines = [
        f"cascade demo: policy {art['hash'][:19]}, nodes {nodes}",
        f"expected (train, out-of-fold): accuracy {exp['accuracy']:.3f} against "
        f"{art['training']['reference_accuracy']:.3f} for {art['reference_model']} alone, at "
        f"{exp['cost_fraction']:.2f} of its cost; {exp['calls_per_query']:.2f} calls per question",
        f"lambda {art['lambda']:.3f} (the cheapest setting reaching {DEMO_TARGET:.0%} of "
        f'{art["reference_model"]}\'s accuracy on train); per request, "cascade": '
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


db_app = typer.Typer(help="The ledger database: migrations and retention.")
app.add_typer(db_app, name="db")


def _database_url(config: Path | None, url: str | None) -> str:
    """--database-url, else $CASCADE_DATABASE_URL, else the config's, else SQLite in ."""
    from proxy.config import DEFAULT_DATABASE_URL, load_config

    if url:
        return url
    if os.environ.get("CASCADE_DATABASE_URL"):
        return os.environ["CASCADE_DATABASE_URL"]
    if config or os.environ.get("CASCADE_CONFIG"):
        return load_config(config).database_url
    return DEFAULT_DATABASE_URL


@db_app.command("upgrade")
def db_upgrade(
    config: Annotated[Path | None, typer.Option(help="Cascade config (YAML).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")] = None,
) -> None:
    """Apply every ledger migration (SQLite or PostgreSQL); safe to run again."""
    from proxy.config import ConfigError
    from proxy.ledger.db import current_revision, upgrade

    url = database_url or ""
    try:
        url = _database_url(config, database_url)
        upgrade(url)
        typer.echo(f"ledger at revision {current_revision(url)} ({_redact(url)})")
    except (ConfigError, ValueError, OSError) as exc:
        fail(_masked(str(exc), url))
    except Exception as exc:  # the database itself: unreachable, refused, ...
        _db_failed("cannot upgrade the ledger at", url, exc)


@db_app.command("current")
def db_current(
    config: Annotated[Path | None, typer.Option(help="Cascade config (YAML).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")] = None,
) -> None:
    """Print the ledger's migration revision and the newest one this version knows."""
    from proxy.ledger.db import current_revision, head_revision

    url = _database_url(config, database_url)
    try:
        typer.echo(f"current {current_revision(url)}; head {head_revision()} ({_redact(url)})")
    except Exception as exc:
        _db_failed("cannot read the ledger at", url, exc)


@db_app.command("prune")
def db_prune(
    before: Annotated[
        str,
        typer.Option(
            help="Delete requests (and their calls) older than this: an ISO date or datetime "
            "(UTC), or Nd for N days ago."
        ),
    ],
    config: Annotated[Path | None, typer.Option(help="Cascade config (YAML).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests deleted per transaction.")] = 5000,
    dry_run: Annotated[
        bool, typer.Option(help="Count what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete old request and call rows in batches; the daily rollups are kept.

    Spend by day, model, cascade and key stays available from the rollups (`cascade report
    spend --since DATE`); the other reports only see the requests that remain.
    """
    from proxy.config import ConfigError
    from proxy.ledger.db import DatabaseUnavailable, SchemaError, check_schema, make_engine
    from proxy.ledger.retention import RetentionError, parse_before, prune

    url = database_url or ""
    try:
        cutoff = parse_before(before)
        if batch_size < 1:
            raise RetentionError(f"--batch-size must be at least 1, not {batch_size}")
        url = _database_url(config, database_url)
        check_schema(url)
        engine = make_engine(url)
        try:
            result = prune(engine, cutoff, batch_size=batch_size, dry_run=dry_run)
        finally:
            engine.dispose()
    except (RetentionError, SchemaError, DatabaseUnavailable, ConfigError, OSError) as exc:
        fail(_masked(str(exc), url))
    except Exception as exc:  # the database itself: refused, dropped, ...
        _db_failed("cannot prune the ledger at", url, exc)
    when = cutoff.isoformat()
    if result.dry_run:
        typer.echo(
            f"would remove {result.rows} rows: {result.requests} requests and {result.calls} "
            f"calls recorded before {when} ({_redact(url)}); nothing deleted"
        )
        return
    typer.echo(
        f"removed {result.rows} rows: {result.requests} requests and {result.calls} calls "
        f"recorded before {when}, in {result.batches} batch(es) ({_redact(url)}); "
        "ledger_daily rollups kept"
    )


report_app = typer.Typer(
    help="Reports over the ledger: spend, savings, exits, latency, errors.",
    no_args_is_help=True,
)
app.add_typer(report_app, name="report")

REPORT_FORMATS = ("table", "csv", "json")


def _report(
    name: str, since: str, by: str | None, fmt: str, config: Path | None, url: str | None
) -> None:
    from proxy.config import ConfigError
    from proxy.ledger.db import DatabaseUnavailable, SchemaError, check_schema, make_engine
    from proxy.ledger.reports import ReportError, parse_since, run_report

    if fmt not in REPORT_FORMATS:
        fail(f"--format {fmt!r} is not one of {', '.join(REPORT_FORMATS)}")
    db_url = url or ""
    try:
        parse_since(since)
        db_url = _database_url(config, url)
        check_schema(db_url)
        engine = make_engine(db_url)
        try:
            report = run_report(engine, name, since, by)
        finally:
            engine.dispose()
    except (SchemaError, DatabaseUnavailable, ReportError, ConfigError, ValueError, OSError) as exc:
        fail(_masked(str(exc), db_url))
    except Exception as exc:  # the database itself: refused, dropped, ...
        _db_failed("cannot read the ledger at", db_url, exc)
    if fmt == "json":
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    if fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=report.columns, lineterminator="\n")
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in report.columns})
        for note in report.notes:
            typer.echo(note, err=True)
        return
    from rich.table import Table

    table = Table(
        title=f"cascade {name} since {report.since:%Y-%m-%d %H:%M} UTC by {report.by} "
        f"({report.source})"
    )
    for col in report.columns:
        table.add_column(col, overflow="fold")
    for row in report.rows:
        table.add_row(*("n/a" if row[c] is None else str(row[c]) for c in report.columns))
    console = _console()
    console.print(table)
    if not report.rows:
        console.print("no requests in the window")
    for note in report.notes:
        console.print(note)


SinceOpt = Annotated[str, typer.Option(help="Window start: 7d, 24h, 30m or an ISO date (UTC).")]
ByOpt = Annotated[
    str | None, typer.Option(help="Group by day, model, cascade or key (default per report).")
]
FormatOpt = Annotated[str, typer.Option("--format", help="table, csv or json.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="Cascade config (YAML).")]
UrlOpt = Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")]


REPORTS = {
    "spend": "Requests, calls, tokens and cost per model (default), day, cascade or key. By "
    "model: requests_answered under the model that answered, calls_made under the one called.",
    "savings": "Actual cost against always calling the reference model, per cascade (default).",
    "exits": "Where queries stop: calls per request, the model returned, and the recall rate.",
    "latency": "p50/p95/p99 latency of requests overall and per model (from the calls).",
    "errors": "Failure rates of calls per model and the requests' HTTP statuses.",
}


def _add_report_command(name: str, doc: str) -> None:
    def command(
        since: SinceOpt = "7d",
        by: ByOpt = None,
        fmt: FormatOpt = "table",
        config: ConfigOpt = None,
        database_url: UrlOpt = None,
    ) -> None:
        _report(name, since, by, fmt, config, database_url)

    command.__doc__ = doc
    report_app.command(name)(command)


for _name, _doc in REPORTS.items():
    _add_report_command(_name, _doc)


def _redact(url: str) -> str:
    """The URL for messages: its password masked, in the user part and in query parameters."""
    from proxy.ledger.db import safe_url

    return safe_url(url)


def _masked(text: str, url: str) -> str:
    """`text` with every secret of the database URL `url` masked."""
    from proxy.ledger.db import redact

    return redact(text, url) if url else text


def _db_failed(what: str, url: str, exc: BaseException) -> None:
    """`fail` for an error of the database itself, with every secret of `url` masked (the
    driver's message may quote the URL or a part of it)."""
    fail(f"{what} {_redact(url)}: {_masked(str(exc), url)}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
