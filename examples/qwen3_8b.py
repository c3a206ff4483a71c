"""EAGLE-3 draft for Qwen3-8B on ShareGPT and UltraChat together (`--tiny`: a tiny Qwen3 with a
Qwen3-style ChatML `<think>` template; UltraChat's place is taken by a local file in its format)."""

import json
from pathlib import Path

from pipeline import TINY, Example, Recipe, main, tiny_family_verifier


def build_tiny(out: Path) -> Path:
    # UltraChat's layout ({"id", "data": [user, assistant, ...]}) as a local file beside the model.
    rows = [{"id": str(i), "data": [f"Give me a fact about the number {i}.", f"{i} is {'even' if i % 2 == 0 else 'odd'}."]}
            for i in range(40)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    (Path(out).parent / "ultrachat_local.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_family_verifier(Path(out), "qwen3", "qwen3")


EXAMPLE = Example(
    name="qwen3_8b",
    model="Qwen/Qwen3-8B",
    recipe=Recipe(data=["sharegpt,weight=1", "ultrachat,weight=1"], max_samples=100000, seq_length=4096,
                  draft_vocab_size=32000, epochs=10, lr=1e-4),
    tiny_recipe=Recipe(data=["sharegpt,weight=1", "{work}/ultrachat_local.jsonl,weight=1"], **TINY),
    build_tiny=build_tiny,
)

if __name__ == "__main__":
    main(EXAMPLE)
