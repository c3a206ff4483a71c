"""`speculators build-vocab-mapping`'s settings (the draft vocabulary), once.

The command's flags, the pipeline's vocab stage (`speculators.config.stages`) and the
dashboard's `draft_vocab_size` field derive from `VocabConfig`.
"""

from __future__ import annotations

from speculators.config.base import TypedSettings, setting

TARGET = "target vocab (one is required)"


class VocabConfig(TypedSettings):
    token_freq_path: str = setting(help="token_freq.pt written by prepare-data", min_length=1)
    draft_vocab_size: int = setting(help="D, the draft model's vocab size (the most frequent target tokens)",
                                    title="Draft vocabulary size", ge=2, le=1_000_000)
    target_vocab_size: int | None = setting(None, "T, the verifier's vocab size", group=TARGET, ge=1)
    target_model_path: str | None = setting(None, "verifier model; T is read from its config", group=TARGET)
    output_path: str = setting(help="directory for d2t.npy and t2d.npy", min_length=1)
