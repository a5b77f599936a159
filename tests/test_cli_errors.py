"""The command line turns errors into messages in one place (cli/app.py): an error of the
cascade tree, at any depth of subcommands, is one `error:` line and exit 2; anything else is
a bug and is not dressed up as the user's fault."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from cli.app import _Commands
from policies.errors import CascadeError, InvalidInput, LedgerError
from policies.traceformat import TraceError
from proxy.config import ConfigError
from proxy.ledger.db import DatabaseUnavailable, SchemaError


def _app(error: BaseException) -> typer.Typer:
    app = typer.Typer(cls=_Commands)
    sub = typer.Typer()
    app.add_typer(sub, name="sub")

    @sub.command("boom")
    def boom() -> None:
        raise error

    @app.command("ok")
    def ok() -> None:
        typer.echo("fine")

    return app


def test_a_cascade_error_in_a_subcommand_is_one_line_and_exit_2() -> None:
    for error in (TraceError("f.jsonl:3: bad"), SchemaError("run `cascade db upgrade`")):
        result = CliRunner().invoke(_app(error), ["sub", "boom"])
        assert result.exit_code == 2
        assert result.stderr == f"error: {error}\n"
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_unexpected_error_is_not_called_the_users_fault() -> None:
    result = CliRunner().invoke(_app(ValueError("a bug")), ["sub", "boom"])
    assert isinstance(result.exception, ValueError)
    assert "error: a bug" not in result.stderr


def test_every_error_the_tree_names_descends_from_cascade_error() -> None:
    assert issubclass(ConfigError, InvalidInput)
    assert issubclass(DatabaseUnavailable, LedgerError)
    assert issubclass(InvalidInput, ValueError) and issubclass(LedgerError, CascadeError)


def test_no_error_class_outside_the_tree() -> None:
    """Every public exception class of the product descends from CascadeError."""
    import ast
    import importlib

    from tests.test_layering import sources

    outside = []
    for module, path in sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            named = isinstance(node, ast.ClassDef) and not node.name.startswith("_")
            if named and node.name.endswith(("Error", "Unavailable")):
                cls = getattr(importlib.import_module(module), node.name)
                if not issubclass(cls, CascadeError):
                    outside.append(f"{module}.{node.name}")
    assert not outside, f"exceptions outside the CascadeError tree: {outside}"
