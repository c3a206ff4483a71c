"""EAGLE-3 draft for Llama-3.1-8B-Instruct on ShareGPT (`--tiny`: a tiny Llama, Llama-3 template)."""

from pathlib import Path

from pipeline import TINY, Example, Recipe, main, tiny_family_verifier

EXAMPLE = Example(
    name="llama3_8b",
    model="meta-llama/Llama-3.1-8B-Instruct",
    recipe=Recipe(data=["sharegpt"], max_samples=50000, seq_length=4096, draft_vocab_size=32000, epochs=10, lr=1e-4),
    tiny_recipe=Recipe(data=["sharegpt"], **TINY),
    build_tiny=lambda out: tiny_family_verifier(Path(out), "llama3", "llama"),
)

if __name__ == "__main__":
    main(EXAMPLE)
