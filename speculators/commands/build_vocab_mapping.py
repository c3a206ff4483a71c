"""`speculators build-vocab-mapping`: pick the draft vocabulary from token frequencies.

Flags, defaults, help and bounds come from `VocabConfig` (speculators.config.vocab).
"""

from __future__ import annotations

import logging

from speculators.config.base import add_arguments
from speculators.config.vocab import VocabConfig

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build-vocab-mapping",
        help="choose the D most frequent target tokens; write d2t.npy and t2d.npy",
        description=(
            "Reads token_freq.pt from prepare-data and writes DIR/d2t.npy (int64 [D], "
            "target_id = i + d2t[i]) and DIR/t2d.npy (bool [T])."
        ),
    )
    add_arguments(p, VocabConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.data.vocab import write_vocab_mapping

    cfg = VocabConfig.from_args(args)
    d2t, t2d = write_vocab_mapping(
        cfg.token_freq_path,
        cfg.draft_vocab_size,
        cfg.output_path,
        target_vocab_size=cfg.target_vocab_size,
        target_model_path=cfg.target_model_path,
    )
    logger.info("build-vocab-mapping: draft vocab %d of %d target tokens -> %s", len(d2t), len(t2d), cfg.output_path)
    return 0
