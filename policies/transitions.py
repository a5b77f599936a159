"""Allowed transitions of a cascade: which node may be explored after which.

Nodes are ordered cheapest first and a transition always goes to a later node. A spec is
`"skips"` (from the start or any node to any later node: the default, ttamer.md §2.2),
`"line"` (start -> first node -> second -> ..., §2.1), or an explicit map from a node name
(or `"start"`) to the names it may go to, which also describes several lines (§2.3). The fit
solves the index only over allowed transitions; the proxy checks that a policy artifact
takes no other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from policies.errors import InvalidInput
from policies.index import ROOT, STOP

START = "start"  # the name of the root in an explicit transition map
TransitionSpec = str | Mapping[str, Sequence[str]]
Edge = tuple[int, int]  # (from node, to node); from ROOT = -1 is the start


class TransitionError(InvalidInput):
    """A transition spec is malformed or names nodes the cascade does not have."""


def parse_spec_text(text: str) -> TransitionSpec:
    """The command-line form: `skips`, `line`, or `start>a,a>b,a>c` (edges by name)."""
    text = text.strip()
    if text in ("skips", "line"):
        return text
    spec: dict[str, list[str]] = {}
    for part in text.split(","):
        src, sep, dst = part.partition(">")
        if not sep or not src.strip() or not dst.strip():
            raise TransitionError(
                f"bad transition {part.strip()!r}: expected FROM>TO (FROM may be {START!r}), "
                "or 'skips' or 'line'"
            )
        spec.setdefault(src.strip(), []).append(dst.strip())
    return spec


def allowed_edges(spec: TransitionSpec | None, nodes: Sequence[str]) -> frozenset[Edge]:
    """The (from, to) index pairs a spec allows over `nodes` (names, cheapest first)."""
    n = len(nodes)
    if spec is None or spec == "skips":
        return frozenset((i, j) for i in range(ROOT, n) for j in range(max(i + 1, 0), n))
    if spec == "line":
        return frozenset((i, i + 1) for i in range(ROOT, n - 1))
    if isinstance(spec, str):
        raise TransitionError(f"unknown transitions {spec!r}: use 'skips', 'line' or a map")
    index = {name: k for k, name in enumerate(nodes)}
    edges = set()
    for src, targets in spec.items():
        if src != START and src not in index:
            raise TransitionError(f"transitions: {src!r} is not a node (nodes: {list(nodes)})")
        i = ROOT if src == START else index[src]
        for dst in targets:
            if dst not in index:
                raise TransitionError(f"transitions: {dst!r} is not a node (nodes: {list(nodes)})")
            if index[dst] <= i:
                raise TransitionError(
                    f"transitions: {src} -> {dst} goes back to a node no pricier than "
                    f"{src}; transitions follow the node order {list(nodes)} (cheapest first)"
                )
            edges.add((i, index[dst]))
    if not any(i == ROOT for i, _ in edges):
        raise TransitionError(f"transitions: nothing leaves {START!r}; add {START}>NODE")
    return frozenset(edges)


def taken_edges(decision: Sequence[Sequence[int] | np.ndarray]) -> frozenset[Edge]:
    """Every transition a decision table (per last node + 1, per state) can take."""
    return frozenset(
        (last, int(nxt))
        for last, row in enumerate(decision, start=ROOT)
        for nxt in set(np.asarray(row, dtype=int).tolist())
        if nxt != STOP
    )


def describe(edges: frozenset[Edge] | set[Edge], nodes: Sequence[str]) -> str:
    """Edges by name, e.g. `start>small, small>large` (for messages and the CLI)."""

    def name(i: int) -> str:
        return START if i == ROOT else nodes[i]

    return ", ".join(f"{name(i)}>{name(j)}" for i, j in sorted(edges))
