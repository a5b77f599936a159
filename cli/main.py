"""The `cascade` command: the Typer app (cli/app.py) with every command registered. The one
place that wires the rooms: calibration (cli/calibrate.py), the proxy (cli/serving.py) and
the ledger (cli/ledger.py). `python -m cli.main` runs it as the console script does."""

from __future__ import annotations

from cli import calibrate, keys, ledger, serving  # noqa: F401  (each registers its commands)
from cli.app import app

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
