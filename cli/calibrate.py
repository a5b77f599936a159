"""`cascade fit`, `evaluate`, `bench` and `collect`: traces in, policy artifacts and
benchmarks out (the calibration room, wired to the upstream clients for `collect`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from cli.app import DEFAULT_TRACES, app, console, fail, load_with_costs, progress_shown


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
    samples: Annotated[
        str | None,
        typer.Option(
            help="Sampled nodes to offer, e.g. '3,5' (every model whose traces hold samples) "
            "or 'a@3,b@5': the model sampled k times (its recorded answer plus k - 1 of its "
            "`samples`), answered by their vote; each becomes node 'a@k'."
        ),
    ] = None,
    label: Annotated[
        str,
        typer.Option(
            help="What the policy optimises: 'correct' (loss 1 - P(correct)) or 'quality' "
            "(graded labels in [0, 1]: loss 1 - E[quality]; accuracy targets are then shares "
            "of the reference model's mean quality)."
        ),
    ] = "correct",
) -> None:
    """Fit the index policy on training traces and write a versioned policy artifact.

    Give exactly one of --lambda, --target-accuracy, --max-cost-usd. Targets are met on the
    training traces with out-of-fold estimates; the artifact records the expected accuracy
    and cost with 95% bootstrap intervals.
    """
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
        traces = load_with_costs(train).with_label(label)
        if samples:
            from calibration.sampling import add_sampled, parse_samples

            traces = add_sampled(traces, parse_samples(samples))
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
    exp = art.expected
    typer.echo(f"wrote {out} ({art.hash[:19]}) in {time.perf_counter() - start:.1f} s")
    typer.echo(f"nodes (cheapest first): {' -> '.join(art.models)}; transitions: {art.transitions}")
    for warning in fitted.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"lambda {art.lam:.4f}; recall {'on' if art.recall else 'off'}")
    choice = fitted.root_choice
    areas = ", ".join(f"{k} {a:.4f}" for k, a in choice["held_out_area"].items())
    typer.echo(f"first move: {ROOT_NAMES[choice['kind']]} (held-out area on train: {areas})")
    measure = "mean quality" if art.label == "quality" else "accuracy"
    low, high = exp.accuracy_95 or (float("nan"), float("nan"))
    typer.echo(
        f"expected on train (out-of-fold): {measure} {exp.accuracy:.3f} [{low:.3f}, {high:.3f}], "
        f"cost {exp.cost_fraction:.3f} x {art.reference_model} "
        f"(${exp.mean_cost_usd:.3g}/query), {exp.calls_per_query:.2f} calls/query"
    )


ROOT_NAMES = {
    "router": "the prompt router's pick",
    "difficulty": "by prompt-difficulty bin",
    "none": "the same for every prompt",
}


@app.command()
def evaluate(
    policy: Annotated[Path, typer.Option(help="Policy artifact written by `cascade fit`.")],
    test: Annotated[Path, typer.Option(help="Traces to replay the policy on (JSONL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Replay a policy on traces: accuracy, cost, latency, calls, where queries stop."""
    from calibration.artifact import load_artifact
    from calibration.evaluate import evaluate_artifact

    art = load_artifact(policy)
    report = evaluate_artifact(art, load_with_costs(test))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    from rich.table import Table

    table = Table(title=f"{policy} on {test}", show_header=False)
    measure = "mean quality" if report["label"] == "quality" else "accuracy"
    rows = [
        ("policy", report["policy_hash"][:19]),
        ("rows", str(report["rows"])),
        (measure, f"{report['accuracy']:.4f}"),
        (
            f"reference {report['reference_model']} {measure}",
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
    console().print(table)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and NAME.png.")],
    traces: Annotated[
        Path, typer.Option(help="Folder of NAME-train.jsonl / NAME-test.jsonl pairs.")
    ] = DEFAULT_TRACES,
    only: Annotated[list[str] | None, typer.Option(help="Run only this pair (repeatable).")] = None,
    samples: Annotated[
        str | None,
        typer.Option(help="Offer sampled nodes on every pair, as `fit --samples` ('3,5')."),
    ] = None,
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
    from calibration.bench import find_pairs, run_bench, verdict
    from calibration.sampling import parse_samples

    specs = parse_samples(samples) if samples is not None else None
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
            samples=specs,
        )
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
        if not progress_shown():
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
            console=console(stderr=True),
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


class _BenchProgress:
    """`cascade bench` as it runs. On a terminal: a bar of pairs done (with time left) and
    one of the current pair's policies done, and each pair's verdict above them as it
    finishes. Elsewhere: the verdict lines alone, one plain line per pair on stdout."""

    def __init__(self, n_pairs: int) -> None:
        self.live = None
        if not progress_shown():
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
            console=console(stderr=True),
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

    graded = [n for n, p in doc["pairs"].items() if "quality" in p]
    for key, title in (
        ("summary", f"cascade bench: {n_pairs} pair(s), test split (means over pairs)"),
        ("summary_quality", f"mean quality against cost: {len(graded)} graded pair(s)"),
    ):
        if key not in doc:
            continue
        table = Table(title=title)
        for col in ("policy", "auc", "cost_to_match_1pp", "acc@0.2", "acc@0.5"):
            table.add_column(col)
        for name, s in doc[key].items():
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
        console().print(table)
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
    samples: Annotated[
        int,
        typer.Option(
            help="Answers recorded per model: k > 1 adds `samples` (k - 1 further answers, "
            "by `n` or parallel calls as the model's `sampling` says) for `fit --samples k`."
        ),
    ] = 1,
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

    from calibration.collect import collect as run_collect
    from proxy.config import load_config

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
                samples=samples,
            )
        )
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
