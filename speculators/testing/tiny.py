"""Test-side name for the tiny builders; the product code lives in `speculators.tiny`."""

from speculators.tiny.builders import (  # noqa: F401
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    build_tiny_verifier,
    tiny_config,
)
