"""The `cascade` Typer app, and the one place where errors become what a user reads.

Every command raises the errors of policies/errors.py (or OSError, for a file it cannot
read or write); `_Commands.invoke` turns them into one `error: ...` line on stderr and exit
status 2, before anything is written. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from policies.errors import CascadeError, InvalidInput

PIPE_WIDTH = 100_000  # columns of a table written to a pipe or file: never wrapped
DEFAULT_TRACES = Path("../shared/data/traces")


class _Commands(TyperGroup):
    """The command group: a user error of any subcommand, at any depth, ends here."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (CascadeError, OSError) as exc:
            if isinstance(exc, BrokenPipeError):
                raise  # click ends quietly on a closed pipe
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None


app = typer.Typer(
    name="cascade",
    cls=_Commands,
    help=(
        "cascade: an OpenAI-compatible LLM cascade router. It tries cheap models first and a "
        "calibrated dynamic-index policy (T-Tamer, with recall) decides when to stop or which "
        "bigger model to pay for, returning the best answer seen. These commands fit that "
        "policy on recorded traces, evaluate it, benchmark it against the baselines, serve "
        "it as a proxy and read its ledger."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> NoReturn:
    """Refuse the command: `error: message`, exit 2 (raised, so it ends where all do)."""
    raise InvalidInput(message)


def console(stderr: bool = False) -> Any:
    """A rich console for tables: the terminal's width on a terminal; on a pipe or file as
    wide as the table, so that no cell is folded at rich's default of 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else PIPE_WIDTH)


def progress_shown() -> bool:
    """A live progress display: only on a terminal (stderr), unless CASCADE_NO_PROGRESS."""
    return sys.stderr.isatty() and not os.environ.get("CASCADE_NO_PROGRESS")


def load_with_costs(path: Path) -> Any:
    """The traces at `path`, costs filled from token counts and prices where missing."""
    from calibration.pricing import fill_costs
    from calibration.traces import load_traces

    return fill_costs(load_traces(path))
