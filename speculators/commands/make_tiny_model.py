"""`speculators make-tiny-model`: a tiny local verifier for CPU demos and trials."""

from __future__ import annotations

import argparse
from pathlib import Path

from speculators.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="build a tiny Llama/Qwen3 verifier with a locally trained tokenizer (no hub needed)",
        description=(
            "Build a tiny causal LM and a byte-level BPE tokenizer with a chat template, "
            "trained locally on ShareGPT text. Used by the CPU demo and the tests."
        ),
    )
    p.add_argument("--output", required=True, help="directory to write the model to (must be new or empty)")
    p.add_argument("--arch", choices=["llama", "qwen3"], default="llama")
    p.add_argument("--template", choices=["llama3", "chatml"], default=None,
                   help="chat template (default: llama3 for llama, chatml for qwen3)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--pretrain-steps", type=int, default=200,
                   help="steps of LM training on chat text so outputs are peaked (0: random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speculators.testing.tiny import build_tiny_verifier

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} is not empty; choose a new directory so nothing is overwritten")
    if args.num_layers < 7:
        raise UserError(
            "--num-layers must be at least 7 so the default EAGLE-3 layers [2, n//2, n-3] are distinct"
        )
    path = build_tiny_verifier(
        out,
        arch=args.arch,
        template=args.template,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        vocab_size=args.vocab_size,
        seed=args.seed,
        pretrain_steps=args.pretrain_steps,
    )
    print(f"tiny verifier written to {path}")
    return 0
