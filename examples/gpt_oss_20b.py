"""EAGLE-3 draft for gpt-oss-20b (MoE, harmony chat format). The loss covers the final answer
and the analysis channel (the reasoning gpt-oss writes before every answer); add
`--no-train-reasoning` to prepare_flags to train on answers only. Best with data whose
responses (and reasoning) the verifier generated itself. `--tiny`: a tiny random GptOss
(router + experts, attention sinks, sliding-window layers) with a harmony template."""

from pathlib import Path

from pipeline import TINY, Example, Recipe, main, tiny_family_verifier

EXAMPLE = Example(
    name="gpt_oss_20b",
    model="openai/gpt-oss-20b",
    recipe=Recipe(data=["sharegpt"], max_samples=50000, seq_length=4096, draft_vocab_size=32000, epochs=10, lr=1e-4),
    tiny_recipe=Recipe(data=["sharegpt"], **{**TINY, "seq_length": 320}),  # harmony's system header is long
    build_tiny=lambda out: tiny_family_verifier(Path(out), "harmony", "gpt_oss"),
)

if __name__ == "__main__":
    main(EXAMPLE)
