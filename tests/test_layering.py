"""The house rule, checked on the source: each room imports only the rooms below it.

    cli             the command line: wires everything           (on proxy.http, calibration)
    proxy.http      app factory, routes, request contract, errors (on proxy.engine, proxy.demo)
    proxy.engine    a request walked through a cascade; reloads  (on proxy.ledger)
    proxy.ledger    records, writer, spool, reports               (on proxy.config)
    proxy.demo      the demo's shipped traces and config          (on proxy.config)
    proxy.config    the server's settings                         (on upstreams)
    calibration     traces in, policy artifacts and benchmarks    (on upstreams)
    upstreams       clients of the model servers, prices, tokens  (on policies)
    policies        pure decision logic (numpy only)

A room imports only the rooms below it, directly or not: the server (proxy) never imports
calibration, nor calibration the server. On top of the ranks: no import cycle
between modules (imports under `if TYPE_CHECKING:` aside: they never run), and no
exemption for any file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("policies", "upstreams", "calibration", "proxy", "cli")
# each room and the rooms directly below it (what it may import, with what they may import)
BELOW: dict[str, set[str]] = {
    "policies": set(),
    "upstreams": {"policies"},
    "calibration": {"upstreams"},
    "proxy.config": {"upstreams"},
    "proxy.demo": {"proxy.config"},
    "proxy.ledger": {"proxy.config"},
    "proxy.engine": {"proxy.ledger"},
    "proxy.http": {"proxy.engine", "proxy.demo"},
    "cli": {"proxy.http", "calibration"},
}
ROOMS = BELOW  # a module's room is its longest matching prefix


def under(room: str) -> set[str]:
    """Every room below `room`, directly or not."""
    out: set[str] = set()
    todo = list(BELOW[room])
    while todo:
        r = todo.pop()
        if r not in out:
            out.add(r)
            todo.extend(BELOW[r])
    return out


def room_of(module: str) -> str | None:
    """The room `module` belongs to (`proxy` alone is the package's docstring: no room)."""
    best = None
    for room in ROOMS:
        if (module == room or module.startswith(room + ".")) and (
            best is None or len(room) > len(best)
        ):
            best = room
    return best


def allowed(importer: str, imported: str) -> bool:
    """Whether a module of room `importer` may import one of room `imported`."""
    return importer == imported or imported in under(importer)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, *, runtime_only: bool = False) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count);
    with `runtime_only`, not those under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if _type_checking_block(node):
                skip.update(id(n) for n in ast.walk(node))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def sources() -> dict[str, Path]:
    return {
        module_name(p): p
        for package in PACKAGES
        for p in sorted((ROOT / package).rglob("*.py"))
        if ".venv" not in p.parts
    }


def test_every_module_has_a_room() -> None:
    homeless = [m for m in sources() if m != "proxy" and room_of(m) is None]
    assert not homeless, f"modules outside every room: {homeless}"


def test_imports_point_down() -> None:
    wrong = []
    for module, path in sources().items():
        mine = room_of(module)
        if mine is None:
            continue
        for name in imports(path):
            theirs = room_of(name)
            if theirs is not None and not allowed(mine, theirs):
                wrong.append(f"{path.relative_to(ROOT)} ({mine}) imports {name} ({theirs})")
    assert not wrong, "imports against the house rule:\n" + "\n".join(sorted(wrong))


def _graph() -> dict[str, set[str]]:
    mods = sources()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        targets = set()
        for name in imports(path, runtime_only=True):
            # `from a.b import c` names a.b.c: a module if one exists, else a name in a.b
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, first = last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_rooms_form_no_cycle() -> None:
    assert all(room not in under(room) for room in BELOW)


def test_no_import_cycles() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_rules_would_catch_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "def f():\n    from calibration.traces import load_traces\n"
        "if TYPE_CHECKING:\n    from proxy.http.app import ProxyState\n"
    )
    assert "calibration.traces" in imports(bad)
    assert "proxy.http.app" not in imports(bad, runtime_only=True)
    assert not allowed(room_of("proxy.engine.cascade"), room_of("calibration.traces"))
    assert not allowed(room_of("calibration.fit"), room_of("proxy.ledger.db"))
    assert not allowed(room_of("policies.policy"), room_of("upstreams.base"))
    assert not allowed(room_of("proxy.engine.cascade"), room_of("proxy.http.app"))
    assert allowed(room_of("cli.main"), room_of("calibration.fit"))
    assert allowed(room_of("calibration.collect"), room_of("upstreams.factory"))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_has_sources(package: str) -> None:
    assert list((ROOT / package).rglob("*.py")), f"no sources under {package}/"
