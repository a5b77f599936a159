"""Upstream backends: openai (any OpenAI-compatible server), litellm (external APIs), replay."""
