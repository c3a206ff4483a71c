"""Locally built verifiers and tokenizers (no model hub): the demo's default verifier and test models."""

from speculators.tiny.builders import build_tiny_tokenizer, build_tiny_verifier, tiny_config  # noqa: F401
