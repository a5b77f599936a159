"""proxy/jsonbytes.py: orjson on the hot path, the stdlib for what only it handles."""

from __future__ import annotations

import json
import math

import pytest

from upstreams.jsonbytes import dumps, loads_lenient


def test_dumps_is_compact_utf8_and_turns_non_finite_floats_into_null() -> None:
    raw = dumps({"text": "café ✓", "n": 1, "x": float("nan"), "y": float("-inf")})
    assert raw == '{"text":"café ✓","n":1,"x":null,"y":null}'.encode()


@pytest.mark.parametrize(
    "value",
    [
        {"n": 2**70, "m": -(2**80)},  # past 64 bits: orjson refuses
        [[[[[[[[[[0]]]]]]]]]] * 2,
        json.loads("[" * 300 + "]" * 300),  # past orjson's 255 levels
    ],
    ids=["big-integers", "shallow", "300-levels"],
)
def test_dumps_falls_back_to_the_stdlib_and_round_trips(value: object) -> None:
    assert json.loads(dumps(value)) == value


def test_loads_lenient_reads_what_only_the_stdlib_reads() -> None:
    raw = b'{"logprob": -Infinity, "p": NaN, "big": 1e400, "id": 18446744073709551616}'
    data = loads_lenient(raw)
    assert data["logprob"] == -math.inf and math.isnan(data["p"]) and data["big"] == math.inf
    assert data["id"] == 2**64  # exact, not a float
    assert loads_lenient(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}


def test_loads_lenient_refuses_what_is_not_json() -> None:
    for raw in (b"{", b"", b"[1,]", b"\xff"):
        with pytest.raises(ValueError):
            loads_lenient(raw)
