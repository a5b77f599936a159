"""The OpenAI-compatible proxy and the `cascade` command line."""
