"""`speculators make-tiny-model`: the embedded default verifier (or a custom tiny one) for CPU runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from speculators.errors import UserError

_CUSTOM_DEFAULTS = {"arch": "llama", "hidden_size": 64, "num_layers": 8, "vocab_size": 512, "pretrain_steps": 200}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="write the embedded default verifier (built once, cached) or a custom tiny Llama/Qwen3",
        description=(
            "Without shape flags: the embedded default verifier (Llama, hidden 128, head_dim 32, 8 layers, "
            "1k BPE vocabulary; trained on ShareGPT, deterministic), built on first use and cached under "
            "$SPECULATORS_CACHE (default ~/.cache/speculators), then copied to --output. With any of "
            "--arch/--template/--hidden-size/--num-layers/--vocab-size/--pretrain-steps/--seed: a custom "
            "tiny model built in place (defaults: llama, hidden 64, 8 layers, vocab 512, 200 steps)."
        ),
    )
    p.add_argument("--output", required=True, help="directory to write the model to (must be new or empty)")
    p.add_argument("--arch", choices=["llama", "qwen3"], default=None)
    p.add_argument("--template", choices=["llama3", "chatml"], default=None,
                   help="chat template (default: llama3 for llama, chatml for qwen3)")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="custom model: steps of LM training on chat text (0: random weights)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} is not empty; choose a new directory so nothing is overwritten")
    custom = {k: getattr(args, k) for k in (*_CUSTOM_DEFAULTS, "template", "seed") if getattr(args, k) is not None}
    if not custom:
        from speculators.tiny.default import copy_default_verifier

        copy_default_verifier(out)
        print(f"tiny verifier written to {out}", flush=True)
        return 0
    settings = {**_CUSTOM_DEFAULTS, "template": None, "seed": 0, **custom}
    if settings["num_layers"] < 7:
        raise UserError(
            "--num-layers must be at least 7 so the default EAGLE-3 layers [2, n//2, n-3] are distinct"
        )
    from speculators.tiny.builders import build_tiny_verifier

    print(f"building a custom tiny verifier in {out}", flush=True)
    path = build_tiny_verifier(out, **settings)
    print(f"tiny verifier written to {path}", flush=True)
    return 0
