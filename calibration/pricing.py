"""Costs for traces recorded without them: token counts (tiktoken) times list prices.

Tokens come from the trace when present, else from tiktoken; prices from litellm's offline
price map. Both through upstreams/pricing.py, the code the proxy prices calls with.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calibration.traces import TraceSet
from upstreams.pricing import (
    MESSAGE_OVERHEAD_TOKENS,
    PricingError,
    count_message_tokens,
    count_tokens,
    lookup_price,
)

__all__ = ["MESSAGE_OVERHEAD_TOKENS", "PricingError", "count_tokens", "fill_costs", "lookup_price"]


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
                tokens_in[r, j] = count_message_tokens(traces.messages[r])
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
