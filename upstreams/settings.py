"""One model's settings (`models.NAME` in the proxy's configuration): where it lives, what it
costs, how long to wait for it. The backends read them; the proxy's configuration
(proxy/config.py) holds one per model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    """One model: where it lives, what it costs, how long to wait for it."""

    backend: Literal["openai", "litellm", "replay"]
    model: str | None = None  # upstream model name (default: the config key)
    base_url: str | None = None  # openai backend: e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # name of the env var holding the upstream key
    traces: list[str] = Field(default_factory=list)  # replay backend: trace JSONL files
    price_in_per_mtok: float | None = Field(default=None, ge=0)
    price_out_per_mtok: float | None = Field(default=None, ge=0)
    gpu_hourly_usd: float | None = Field(default=None, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)
    ttft_timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    max_concurrency: int = Field(default=64, ge=1)
    logprobs: bool = True  # ask the upstream for token logprobs (confidence signal)
    # how a sampled node `NAME@k` gets its k samples: one call with `n: k` (vLLM shares the
    # prefill), or k parallel calls for an upstream that does not honour `n`
    sampling: Literal["n", "parallel"] = "n"

    @model_validator(mode="after")
    def _backend_fields(self) -> ModelConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if self.backend == "replay" and not self.traces:
            raise ValueError("backend 'replay' needs traces (a list of trace JSONL files)")
        return self
