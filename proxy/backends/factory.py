"""One backend per configured model, chosen by `backend:` in its configuration."""

from __future__ import annotations

from proxy.backends.base import Backend
from proxy.config import ModelConfig


def make_backend(name: str, cfg: ModelConfig) -> Backend:
    """The backend for model `name`: openai (aiohttp), litellm (lazy import) or replay.
    Replay loads its traces here and raises ValueError naming a bad file."""
    if cfg.backend == "openai":
        from proxy.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(name, cfg)
    if cfg.backend == "litellm":
        from proxy.backends.litellm_backend import LiteLLMBackend

        return LiteLLMBackend(name, cfg)
    if cfg.backend == "replay":
        from proxy.backends.replay import ReplayBackend

        return ReplayBackend(name, cfg)
    raise ValueError(f"model {name!r}: unknown backend {cfg.backend!r}")
