"""Costs for traces recorded without them: token counts (tiktoken) times list prices.

Tokens come from the trace when present, else from tiktoken's `cl100k_base` (the offline copy
bundled inside litellm). Prices come from litellm's offline price map
(LITELLM_LOCAL_MODEL_COST_MAP=True, so nothing is fetched), looked up by exact name, else by
the name under a provider prefix, preferring well-known hosts. Both imports are lazy:
litellm takes seconds to import and only traces without costs need it.
"""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache

import numpy as np

from calibration.traces import TraceSet

PREFERRED_PROVIDERS = ("openai", "anthropic", "together_ai", "deepinfra", "fireworks_ai")
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message (OpenAI's rule of thumb)


class PricingError(ValueError):
    """A model has no recorded cost and no known price."""


@lru_cache(maxsize=1)
def _price_map() -> dict:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm.model_cost


@lru_cache(maxsize=1)
def _encoding():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # importing this module points TIKTOKEN_CACHE_DIR at litellm's bundled encodings
    from litellm.litellm_core_utils.default_encoding import encoding

    return encoding


def count_tokens(text: str | None) -> int:
    return len(_encoding().encode(text or "", disallowed_special=()))


def lookup_price(model: str) -> tuple[str, float, float]:
    """(price-map key, USD per input token, USD per output token) for a model name."""
    prices = _price_map()

    def usable(key: str) -> bool:
        entry = prices.get(key) or {}
        return (
            entry.get("input_cost_per_token") is not None
            and entry.get("output_cost_per_token") is not None
        )

    wanted = model.lower()
    keys = [k for k in prices if k.lower() == wanted and usable(k)]
    if not keys:
        keys = sorted(k for k in prices if k.lower().endswith("/" + wanted) and usable(k))

        def rank(key: str) -> tuple[int, str]:
            provider = key.split("/", 1)[0]
            order = PREFERRED_PROVIDERS.index(provider) if provider in PREFERRED_PROVIDERS else 99
            return order, key

        keys.sort(key=rank)
    if not keys:
        raise PricingError(
            f"model {model!r} has no recorded cost and no entry in litellm's price map; "
            "record cost_usd in the traces or give the model a price"
        )
    entry = prices[keys[0]]
    return keys[0], float(entry["input_cost_per_token"]), float(entry["output_cost_per_token"])


def fill_costs(traces: TraceSet) -> TraceSet:
    """The same traces with every missing cost computed from tokens and list prices.

    Models whose costs are all recorded are left as they are; `cost_source` says where the
    costs of the others came from.
    """
    missing = np.isnan(traces.cost_usd)
    if not missing.any():
        return traces
    tokens_in = traces.tokens_in.copy()
    tokens_out = traces.tokens_out.copy()
    cost = traces.cost_usd.copy()
    sources = []
    for j, model in enumerate(traces.models):
        if not missing[:, j].any():
            continue
        key, p_in, p_out = lookup_price(model)
        for r in np.flatnonzero(missing[:, j]):
            if np.isnan(tokens_in[r, j]):
                tokens_in[r, j] = sum(
                    count_tokens(m.get("content")) + MESSAGE_OVERHEAD_TOKENS
                    for m in traces.messages[r]
                )
            if np.isnan(tokens_out[r, j]):
                tokens_out[r, j] = count_tokens(traces.answers[r][j])
            cost[r, j] = tokens_in[r, j] * p_in + tokens_out[r, j] * p_out
        sources.append(
            f"{model} = tokens (tiktoken cl100k_base where the trace has none) x litellm price "
            f"map entry {key} (${p_in * 1e6:.3g}/M in, ${p_out * 1e6:.3g}/M out)"
        )
    return dataclasses.replace(
        traces,
        cost_usd=cost,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cost_source="; ".join(sources),
    )
