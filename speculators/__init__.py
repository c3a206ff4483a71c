"""Train EAGLE-3 speculative-decoding draft models and serve them in vLLM."""

__version__ = "0.1.0"
