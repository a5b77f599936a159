"""One backend per configured model, chosen by `backend:` in its configuration."""

from __future__ import annotations

from policies.errors import InvalidInput
from upstreams.base import Backend
from upstreams.settings import ModelConfig


def make_backend(name: str, cfg: ModelConfig) -> Backend:
    """The backend for model `name`: openai (aiohttp), litellm (lazy import) or replay.
    Replay loads its traces here and raises ValueError naming a bad file."""
    if cfg.backend == "openai":
        from upstreams.openai_compat import OpenAIBackend

        return OpenAIBackend(name, cfg)
    if cfg.backend == "litellm":
        from upstreams.litellm_backend import LiteLLMBackend

        return LiteLLMBackend(name, cfg)
    if cfg.backend == "replay":
        from upstreams.replay import ReplayBackend

        return ReplayBackend(name, cfg)
    raise InvalidInput(f"model {name!r}: unknown backend {cfg.backend!r}")
