"""`speculators prepare-data`'s settings: every flag's default, help and bounds, once.

`PrepareConfig` is what `speculators.data.prepare.prepare_data` reads; the command's flags
(`speculators.commands.prepare_data`), the pipeline's prepare stage
(`speculators.config.stages`) and the dashboard's `max_samples` field derive from it.
"""

from __future__ import annotations

from typing import Literal

from speculators.config.base import TypedSettings, setting

ROWS = ("per-conversation", "per-turn")
# prepare-data holds every kept sample's token ids in memory: more samples than this is a typo
MAX_SAMPLES = 10_000_000


class PrepareConfig(TypedSettings):
    """``data``: one source or several (see `speculators.data.sources`, options after commas).

    ``rows``: ``per-conversation`` (one row per conversation, every assistant turn
    trained) or ``per-turn`` (one row per assistant turn, earlier turns as unmasked
    context: the public speculators package's layout). ``opening_assistant``: None = drop
    per conversation, context per turn (the public layout).
    """

    model: str = setting(help="verifier model dir or HF id (its tokenizer is used)", min_length=1)
    data: str | list[str] = setting(
        help="repeatable. sharegpt (offline) | ultrachat (HuggingFaceH4/ultrachat_200k) | PATH.jsonl | PATH.json | "
             "DATASET_DIR | HF id[:split]; options after commas: ,max=N (samples from this source), "
             ",weight=W (its share of --max-samples), ,split=NAME (split of a dataset directory)", repeat=True)
    output: str = setting(help="output directory", min_length=1)
    seq_length: int = setting(help="truncate each sample to this many tokens", ge=2)
    max_samples: int | None = setting(None, "keep at most this many samples (rows) in all; split between sources "
                                      "by weight (default: all)", title="Samples", ge=1,
                                      le=MAX_SAMPLES)
    seed: int = setting(0, "shuffle seed applied before --max-samples")
    batch_size: int = setting(512, "conversations tokenized per batch", cli=False, ge=1)
    force: bool = setting(False, "rebuild even if --output is up to date")
    rows: Literal["per-conversation", "per-turn"] = setting(
        "per-conversation", "per-conversation: one row per conversation, every assistant turn trained (fewer "
        "tokens per epoch); per-turn: one row per assistant turn with earlier turns as untrained context (the "
        "public speculators layout; more context, history tokens repeated)")
    train_reasoning: bool = setting(
        True, "leave reasoning text (reasoning_content, think blocks, gpt-oss analysis) out of the loss",
        flag="--no-train-reasoning", negate=True)
    train_after_end_of_turn: bool = setting(
        False, "per-turn: also train tokens after the end-of-turn token (ChatML's newline), exactly as the public "
        "speculators package does")
    opening_assistant: Literal["drop", "context"] | None = setting(
        None, "assistant messages before the first prompt: drop them, or keep them as untrained context "
        "(default: drop per conversation, context per turn as the public package does)")

    def opening(self) -> str:
        if self.opening_assistant is not None:
            return self.opening_assistant
        return "context" if self.rows == "per-turn" else "drop"

    def sources(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)
