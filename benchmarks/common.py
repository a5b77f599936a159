"""What every benchmark script shares: the repository root, the description of the machine
and of how the script was run, the --traces option and main()'s signal and error handling.

Imported as `common` by the scripts of this folder (run as scripts, their folder is on
sys.path); it prints nothing by itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without the editable install too
    sys.path.insert(0, str(REPO))

TRACES = REPO.parent / "shared" / "data" / "traces"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def now_utc() -> str:
    """The date line's value: now, UTC, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def machine() -> str:
    """The machine line's value: platform, CPU model and CPU count."""
    return f"{platform.platform()}; {cpu_model()}; {os.cpu_count()} CPU(s)"


def command(cwd: bool = True) -> str:
    """The command line this process was started with (and where)."""
    line = " ".join(getattr(sys, "orig_argv", sys.argv))
    return f"{line} (cwd {Path.cwd()})" if cwd else line


def add_traces_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--traces",
        type=Path,
        default=TRACES,
        help="folder of the recorded traces (default: ../shared/data/traces from the repo)",
    )


def missing_train_traces(args: argparse.Namespace) -> bool:
    """True, with the error printed, when --traces has no mmlu-llama-train.jsonl."""
    if (args.traces / "mmlu-llama-train.jsonl").is_file():
        return False
    print(f"error: mmlu-llama-train.jsonl not found in {args.traces}", file=sys.stderr)
    return True


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)` with SIGTERM as Ctrl-C: 1 on RuntimeError, 130 when interrupted (the
    scripts stop every child process in their own `finally`)."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return run(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}): every child process was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
