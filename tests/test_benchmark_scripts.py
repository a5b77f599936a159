"""The benchmark scripts share helpers through benchmarks/common.py and benchmarks/loadgen.py
only: no script imports another (one used to be the others' library, through its private
helpers), and every script still starts (its --help imports all it imports at the top).
Nothing here runs a benchmark or times anything."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = {"common", "loadgen"}  # the modules the scripts share
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in SHARED)


def _local_imports(path: Path) -> set[str]:
    """The modules of benchmarks/ that `path` imports, at any depth."""
    local = {p.stem for p in BENCHMARKS.glob("*.py")}
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & local


def test_no_script_imports_another() -> None:
    wrong = {
        f"{name}.py imports {', '.join(sorted(other))}"
        for name in SCRIPTS
        if (other := _local_imports(BENCHMARKS / f"{name}.py") - SHARED)
    }
    wrong |= {
        f"{name}.py imports {', '.join(sorted(other))}"
        for name in SHARED
        if (BENCHMARKS / f"{name}.py").is_file()
        and (other := _local_imports(BENCHMARKS / f"{name}.py") - {"common", name})
    }
    assert not wrong, "benchmark modules importing scripts:\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize("name", [*SCRIPTS, *sorted(SHARED)])
def test_every_script_starts(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: "), done.stdout[:500]
