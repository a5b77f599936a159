"""`cascade demo`: a cascade over replay backends built from the shipped GSM8K traces.

No GPU, no API key, no database: two recorded models (Mixtral-8x7B-Instruct and
gpt-4-1106-preview) answer from `gsm8k-routellm-*.jsonl`, priced from token counts and
litellm's offline list prices; the policy is fitted on the train file.
"""

from __future__ import annotations

from pathlib import Path

from proxy.config import Config, parse_config

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "gsm8k-routellm-train.jsonl"
TEST = HERE / "gsm8k-routellm-test.jsonl"
SMALL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
LARGE = "gpt-4-1106-preview"
CASCADE = "gsm8k-demo"


def demo_config(policy_path: Path) -> Config:
    """Both recorded models as replay backends and one cascade over them."""
    traces = [str(TRAIN), str(TEST)]
    return parse_config(
        {
            "models": {
                SMALL: {"backend": "replay", "traces": traces},
                LARGE: {"backend": "replay", "traces": traces},
            },
            "cascades": {
                CASCADE: {"nodes": [SMALL, LARGE], "reference": LARGE, "policy": str(policy_path)}
            },
        },
        source="cascade demo",
    )
