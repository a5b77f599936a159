"""The dependency rule of DESIGN.md, checked on the source: policies imports nothing of ours,
calibration does not import the proxy except its backends (for `collect`), the proxy does not
import calibration; only the CLI may import all three."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("policies", "calibration", "proxy")
CLI = ROOT / "proxy" / "cli.py"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _allowed(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top not in OURS or top == package:
        return True
    if package == "calibration":
        return top == "policies" or module.startswith("proxy.backends")
    if package == "proxy":
        return top == "policies"
    return False  # policies imports nothing of ours


@pytest.mark.parametrize("package", OURS)
def test_imports_point_one_way(package: str) -> None:
    files = [p for p in (ROOT / package).rglob("*.py") if p != CLI]
    assert files, f"no sources found under {package}/"
    wrong = sorted(
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in _imports(path)
        if not _allowed(package, module)
    )
    assert not wrong, "imports against the dependency rule:\n" + "\n".join(wrong)


def test_the_rule_would_catch_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from calibration.traces import load_traces\n")
    assert "calibration.traces" in _imports(bad)
    assert not _allowed("proxy", "calibration.traces")
    assert not _allowed("policies", "proxy.config")
    assert _allowed("calibration", "proxy.backends.factory")
