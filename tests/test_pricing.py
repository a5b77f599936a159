"""Costs from token counts and list prices, fully offline (litellm's bundled map and encodings)."""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np
import pytest

from calibration.pricing import (
    MESSAGE_OVERHEAD_TOKENS,
    PricingError,
    count_tokens,
    fill_costs,
    lookup_price,
)
from calibration.traces import RECORDED_COSTS, TraceSet, load_traces
from tests.shipped import ALPACA_TRAIN, GSM8K_TRAIN


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any attempt to open a connection fails (module scope: set before the other fixtures)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"pricing tried to reach the network: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def gsm8k() -> TraceSet:
    return load_traces(GSM8K_TRAIN)


@pytest.fixture(scope="module")
def filled(gsm8k: TraceSet) -> TraceSet:
    return fill_costs(gsm8k)


def test_lookup_price_of_a_known_model() -> None:
    key, p_in, p_out = lookup_price("gpt-4-1106-preview")
    assert key == "gpt-4-1106-preview"
    assert p_in > 0 and p_out > 0
    assert p_out >= p_in  # output tokens cost at least as much for this model
    assert p_in < 1e-3  # a price per token, not per million
    assert os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP") == "True"


def test_lookup_price_ignores_case() -> None:
    assert lookup_price("GPT-4-1106-Preview") == lookup_price("gpt-4-1106-preview")


def test_lookup_price_finds_a_name_under_a_provider_prefix() -> None:
    key, p_in, p_out = lookup_price("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert key.lower().endswith("/mistralai/mixtral-8x7b-instruct-v0.1")
    assert key.split("/", 1)[0] in ("openai", "anthropic", "together_ai", "deepinfra")
    assert p_in > 0 and p_out > 0


def test_unknown_model_raises_a_clear_pricing_error() -> None:
    with pytest.raises(PricingError) as info:
        lookup_price("no-such-model-7f3a")
    message = str(info.value)
    assert "'no-such-model-7f3a'" in message
    assert "price map" in message
    assert "cost_usd" in message  # says how to fix it
    assert isinstance(info.value, ValueError)  # the CLI reports ValueErrors as bad input


def test_count_tokens_uses_cl100k_base() -> None:
    assert count_tokens("hello world") == 2
    assert count_tokens("") == 0
    assert count_tokens(None) == 0
    assert count_tokens("<|endoftext|>") > 1  # special tokens are plain text here


def test_fill_costs_gives_every_row_a_positive_cost(gsm8k: TraceSet, filled: TraceSet) -> None:
    assert np.isnan(gsm8k.cost_usd).all()  # the premise: the trace has no costs
    assert np.isnan(gsm8k.tokens_in).all() and np.isnan(gsm8k.tokens_out).all()
    assert filled.cost_usd.shape == gsm8k.cost_usd.shape
    assert np.isfinite(filled.cost_usd).all()
    assert (filled.cost_usd > 0).all()
    assert (filled.tokens_in > 0).all() and (filled.tokens_out >= 0).all()
    assert "tiktoken" in filled.cost_source
    assert "price map" in filled.cost_source
    for model in gsm8k.models:
        assert model in filled.cost_source
    # the input is left as it was
    assert np.isnan(gsm8k.cost_usd).all()
    assert gsm8k.cost_source == RECORDED_COSTS
    # everything else is carried over
    assert filled.ids == gsm8k.ids and filled.models == gsm8k.models
    np.testing.assert_array_equal(filled.correct, gsm8k.correct)


def test_fill_costs_is_tokens_times_list_prices(gsm8k: TraceSet, filled: TraceSet) -> None:
    for j, model in enumerate(gsm8k.models):
        _, p_in, p_out = lookup_price(model)
        for r in (0, 1, len(gsm8k) - 1):
            tokens_in = sum(
                count_tokens(m.get("content")) + MESSAGE_OVERHEAD_TOKENS for m in gsm8k.messages[r]
            )
            tokens_out = count_tokens(gsm8k.answers[r][j])
            assert filled.tokens_in[r, j] == tokens_in
            assert filled.tokens_out[r, j] == tokens_out
            assert filled.cost_usd[r, j] == pytest.approx(tokens_in * p_in + tokens_out * p_out)
    # gpt-4 costs more than Mixtral on every row (same prompt, much higher price)
    gpt4 = gsm8k.models.index("gpt-4-1106-preview")
    other = 1 - gpt4
    assert (filled.cost_usd[:, gpt4] > filled.cost_usd[:, other]).all()


def test_fill_costs_only_fills_what_is_missing(filled: TraceSet) -> None:
    gpt4 = filled.models.index("gpt-4-1106-preview")
    other = 1 - gpt4
    partial_cost = filled.cost_usd.copy()
    partial_cost[:, other] = np.nan
    partial_cost[:, gpt4] = 0.5  # recorded costs, obviously not from the price map
    partial = dataclasses.replace(filled, cost_usd=partial_cost, cost_source="trace")
    again = fill_costs(partial)
    assert (again.cost_usd[:, gpt4] == 0.5).all()
    np.testing.assert_allclose(again.cost_usd[:, other], filled.cost_usd[:, other])
    assert filled.models[other] in again.cost_source
    assert "gpt-4-1106-preview" not in again.cost_source


def test_fill_costs_leaves_traces_with_costs_unchanged() -> None:
    recorded = load_traces(ALPACA_TRAIN)  # costs recorded in the traces
    assert not np.isnan(recorded.cost_usd).any()
    before = recorded.cost_usd.copy()
    out = fill_costs(recorded)
    assert out is recorded
    assert out.cost_source == RECORDED_COSTS
    np.testing.assert_array_equal(out.cost_usd, before)


def test_fill_costs_names_a_model_without_a_price(gsm8k: TraceSet) -> None:
    unknown = dataclasses.replace(gsm8k, models=("no-such-model-7f3a", gsm8k.models[1]))
    with pytest.raises(PricingError, match="no-such-model-7f3a"):
        fill_costs(unknown)
