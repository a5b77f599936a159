"""The recorded traces the repository ships (Apache-2.0, see NOTICE): the real answers a test
can read without ../shared. Not a test module."""

from __future__ import annotations

from pathlib import Path

from proxy import demo

DATA = Path(__file__).resolve().parent / "data"
# GSM8K, Mixtral-8x7B-Instruct and gpt-4-1106-preview (RouteLLM): chains of thought, no
# confidence, no cost or tokens (priced from token counts); what `cascade demo` serves
GSM8K_TRAIN, GSM8K_TEST = demo.TRAIN, demo.TEST
# AlpacaEval 2.0, four FuseChat models: long free-text answers, judged quality, recorded costs
# and tokens, no confidence; the first 100 rows of each split (tests/data/README.md)
ALPACA_TRAIN = DATA / "alpaca-fusechat-train.jsonl"
ALPACA_TEST = DATA / "alpaca-fusechat-test.jsonl"
SHIPPED = (GSM8K_TRAIN, GSM8K_TEST, ALPACA_TRAIN, ALPACA_TEST)
