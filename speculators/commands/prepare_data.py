"""`speculators prepare-data`: tokenize conversations with the verifier's chat template.

Flags, defaults, help and bounds come from `PrepareConfig` (speculators.config.prepare).
"""

from __future__ import annotations

import logging

from speculators.config.base import add_arguments
from speculators.config.prepare import PrepareConfig

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenize chat data with the verifier's template and an assistant loss mask",
        description=(
            "Tokenize conversations with the verifier tokenizer's chat template. loss_mask is 1 "
            "on assistant tokens (incl. their end-of-turn token). Writes an HF dataset, "
            "token_freq.pt and prepare_config.json to --output; reruns with the same inputs are cached."
        ),
    )
    add_arguments(p, PrepareConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.data.prepare import prepare_data

    cfg = PrepareConfig.from_args(args)
    if isinstance(cfg.data, list) and len(cfg.data) == 1:
        cfg = cfg.model_copy(update={"data": cfg.data[0]})  # one source: recorded as before, a string
    result = prepare_data(cfg)
    dropped = sum(result.dropped.values())
    status = "cached" if result.cached else f"{result.seconds:.1f}s"
    logger.info(
        "%s", f"prepare-data: {result.kept} samples, {result.total_tokens} tokens "
        f"({result.assistant_tokens} assistant), truncated {result.truncated}, "
        f"dropped {dropped}{' ' + str(result.dropped) if dropped else ''} -> {result.output} [{status}]"
    )
    return 0
