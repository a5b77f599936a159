"""Clients of the model servers a cascade calls: `openai` (any OpenAI-compatible server:
vLLM, SGLang, llama.cpp), `litellm` (external APIs, imported lazily) and `replay` (recorded
traces), with their prices and token counts. Calibration (`collect`) and the proxy both call
models through here, so costs and confidences are the same in both."""
