"""`speculators prepare-data`: tokenize conversations with the verifier's chat template."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenize chat data with the verifier's template and an assistant loss mask",
        description=(
            "Tokenize conversations with the verifier tokenizer's chat template. loss_mask is 1 "
            "on assistant tokens (incl. their end-of-turn token). Writes an HF dataset, "
            "token_freq.pt and prepare_config.json to --output; reruns with the same inputs are cached."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="verifier model dir or HF id (its tokenizer is used)")
    p.add_argument(
        "--data",
        required=True,
        help="sharegpt (offline) | ultrachat (HuggingFaceH4/ultrachat_200k) | PATH.jsonl | PATH.json | HF id[:split]",
    )
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--max-samples", type=int, default=None, help="keep at most this many conversations")
    p.add_argument("--seq-length", type=int, required=True, help="truncate each sample to this many tokens")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed applied before --max-samples")
    p.add_argument("--force", action="store_true", help="rebuild even if --output is up to date")
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.data.prepare import PrepareConfig, prepare_data

    result = prepare_data(
        PrepareConfig(
            model=args.model,
            data=args.data,
            output=args.output,
            seq_length=args.seq_length,
            max_samples=args.max_samples,
            seed=args.seed,
            force=args.force,
        )
    )
    dropped = sum(result.dropped.values())
    status = "cached" if result.cached else f"{result.seconds:.1f}s"
    print(
        f"prepare-data: {result.kept} samples, {result.total_tokens} tokens "
        f"({result.assistant_tokens} assistant), truncated {result.truncated}, "
        f"dropped {dropped}{' ' + str(result.dropped) if dropped else ''} -> {result.output} [{status}]"
    )
    return 0
