"""Prices and token counts for upstream calls: one implementation for serving and calibration.

Prices come from litellm's offline price map (LITELLM_LOCAL_MODEL_COST_MAP=True, so nothing
is fetched), looked up by exact name, else by the name under a provider prefix, preferring
well-known hosts. Tokens are counted with tiktoken's `cl100k_base`, the offline copy bundled
inside litellm (read without importing litellm). Both loads are lazy: litellm takes seconds to
import.
"""

from __future__ import annotations

import os
from functools import lru_cache

from policies.errors import InvalidInput

PREFERRED_PROVIDERS = ("openai", "anthropic", "together_ai", "deepinfra", "fireworks_ai")
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators per chat message (OpenAI's rule of thumb)


class PricingError(InvalidInput):
    """A model has no known price."""


@lru_cache(maxsize=1)
def _price_map() -> dict:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm.model_cost


@lru_cache(maxsize=1)
def _encoding():
    """cl100k_base from the copy bundled inside litellm, read as litellm's own
    `default_encoding` reads it (TIKTOKEN_CACHE_DIR pointed at that folder, unless
    CUSTOM_TIKTOKEN_CACHE_DIR is set) but without importing litellm: a tenth of a second
    instead of seconds, so a proxy whose models all have configured prices can count a
    broken stream's tokens on first need without litellm's import (or its memory)."""
    import importlib.util

    import tiktoken

    custom = os.getenv("CUSTOM_TIKTOKEN_CACHE_DIR")
    if custom:
        os.makedirs(custom, exist_ok=True)
        os.environ["TIKTOKEN_CACHE_DIR"] = custom
    else:
        spec = importlib.util.find_spec("litellm")  # finds the package, does not run it
        if spec is None or spec.origin is None:
            raise RuntimeError("litellm is not installed: its bundled tokenizer is needed")
        folder = os.path.join(os.path.dirname(spec.origin), "litellm_core_utils", "tokenizers")
        os.environ["TIKTOKEN_CACHE_DIR"] = folder
    return tiktoken.get_encoding("cl100k_base")


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
            f"model {model!r} has no entry in litellm's price map; give it a price "
            "(price_in_per_mtok / price_out_per_mtok) or record cost_usd in its traces"
        )
    entry = prices[keys[0]]
    return keys[0], float(entry["input_cost_per_token"]), float(entry["output_cost_per_token"])


def count_message_tokens(messages: list[dict]) -> int:
    """Prompt tokens of a chat request, counted the way OpenAI's rule of thumb does."""
    return sum(
        count_tokens(str(m.get("content") or "")) + MESSAGE_OVERHEAD_TOKENS for m in messages
    )


def warm_up() -> None:
    """Load the price map and the tokenizer (seconds: litellm) before serving requests."""
    _price_map()
    _encoding()
