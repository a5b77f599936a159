"""What a serving process tells its operator on stderr (logger `cascade`): one line when it
starts (where it listens, each cascade with its policy, the ledger and the spool), one per
policy reload (proxy/engine/reload.py), and one when it stops (what its ledger writer did).

`cascade serve` configures the logger (cli/main.py); with `--workers N` every worker logs
its own lines, with its own pid and spool slot.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.ledger.db import safe_url, sqlite_file

if TYPE_CHECKING:
    from proxy.http.state import ProxyState

log = logging.getLogger("cascade")

# The address `cascade serve` listens on, for the start line of each process that serves it
# (uvicorn's workers are spawned: the environment is what crosses over).
LISTEN_ENV = "CASCADE_LISTEN"
SHORT_HASH = 19  # "sha256:" and 12 hex digits, as everywhere else the hash is shown


def short_hash(policy_hash: str | None) -> str:
    return "none" if not policy_hash else policy_hash[:SHORT_HASH]


def start_line(state: ProxyState, address: str | None) -> str:
    """`serving on ADDRESS (pid N): cascade qa policy sha256:... (a -> b), ...; database
    URL (password masked); spool PATH`."""
    where = f"serving on {address}" if address else "serving"
    cascades = [
        f"cascade {name} policy {short_hash(engine.policy_hash)} ({' -> '.join(engine.nodes)})"
        if engine.policy_hash
        else f"cascade {name} without a policy (always {engine.reference})"
        for name, engine in state.engines.items()
    ]
    spool = "none (no ledger)"
    if state.ledger is not None:
        spool = str(Path(state.ledger.spool_path).resolve())
    return (
        f"{where} (pid {os.getpid()}): {', '.join(cascades) or 'no cascades'}; "
        f"models {', '.join(state.backends)}; database {_database(state.config.database_url)}; "
        f"spool {spool}"
    )


def _database(url: str) -> str:
    """The ledger's URL, password masked; a SQLite file by its absolute path (the working
    directory is not in the log)."""
    path = sqlite_file(url)
    if path is not None and not path.is_absolute():
        return f"sqlite:///{path.resolve()}"
    return safe_url(url)


def stop_line(state: ProxyState) -> str:
    """`stopped (pid N): ledger: W request(s) written, R replayed from the spool, S left in
    the spool PATH`, read after the ledger writer was closed (everything flushed)."""
    if state.ledger is None:
        return f"stopped (pid {os.getpid()}): no ledger"
    stats = state.ledger.stats()
    line = (
        f"stopped (pid {os.getpid()}): ledger: {stats['written']} request(s) written, "
        f"{stats['replayed']} replayed from the spool, {stats['spool_backlog']} left in the "
        f"spool {Path(state.ledger.spool_path).resolve()}"
    )
    if stats["rejected"]:
        line += f", {stats['rejected']} rejected (see {state.ledger.rejected_path})"
    return line


def started(state: ProxyState) -> None:
    log.info(start_line(state, os.environ.get(LISTEN_ENV)))


def stopped(state: ProxyState) -> None:
    log.info(stop_line(state))
