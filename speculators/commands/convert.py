"""`speculators convert`: a draft checkpoint from another trainer -> this package's format."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a SpecForge EAGLE-3 draft checkpoint to the speculators format",
        description=(
            "Reads a SpecForge (sgl-project/SpecForge) Llama EAGLE-3 draft directory (config.json with "
            "architectures LlamaForCausalLMEagle3, midlayer.* tensors) and writes config.json + "
            "model.safetensors in the speculators eagle3 format to --output, ready for `speculators eval`, "
            "`speculators train --from-pretrained` and `vllm serve`. Drafts saved by the public "
            "speculators package need no conversion. The key mapping is in docs/training.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="SpecForge checkpoint directory")
    p.add_argument("--from", dest="source_format", choices=["specforge"], default="specforge",
                   help="layout of SOURCE")
    p.add_argument("--verifier", required=True,
                   help="the verifier (target) model the draft was trained for: directory or HF id")
    p.add_argument("--output", required=True, help="new (or empty) directory for the converted draft")
    p.add_argument("--speculative-tokens", type=int, default=3, help="draft tokens per step written for vLLM")
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.models.eagle3.specforge import convert_specforge

    out = convert_specforge(args.source, args.output, args.verifier, args.speculative_tokens)
    logger.info("convert: SpecForge draft %s -> %s", args.source, out)
    return 0
