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
        action="append",
        help="repeatable. sharegpt (offline) | ultrachat (HuggingFaceH4/ultrachat_200k) | PATH.jsonl | PATH.json | "
             "DATASET_DIR | HF id[:split]; options after commas: ,max=N (samples from this source), "
             ",weight=W (its share of --max-samples), ,split=NAME (split of a dataset directory)",
    )
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--max-samples", type=int, default=None,
                   help="keep at most this many samples (rows) in all; split between sources by weight")
    p.add_argument("--rows", choices=["per-conversation", "per-turn"], default="per-conversation",
                   help="per-conversation: one row per conversation, every assistant turn trained (fewer tokens "
                        "per epoch); per-turn: one row per assistant turn with earlier turns as untrained context "
                        "(the public speculators layout; more context, history tokens repeated)")
    p.add_argument("--no-train-reasoning", dest="train_reasoning", action="store_false",
                   help="leave reasoning text (reasoning_content, think blocks, gpt-oss analysis) out of the loss")
    p.add_argument("--opening-assistant", choices=["drop", "context"], default=None,
                   help="assistant messages before the first prompt: drop them, or keep them as untrained "
                        "context (default: drop per conversation, context per turn as the public package does)")
    p.add_argument("--train-after-end-of-turn", action="store_true",
                   help="per-turn: also train tokens after the end-of-turn token (ChatML's newline), "
                        "exactly as the public speculators package does")
    p.add_argument("--seq-length", type=int, required=True, help="truncate each sample to this many tokens")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed applied before --max-samples")
    p.add_argument("--force", action="store_true", help="rebuild even if --output is up to date")
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.data.prepare import PrepareConfig, prepare_data

    result = prepare_data(
        PrepareConfig(
            model=args.model,
            data=args.data if len(args.data) > 1 else args.data[0],
            output=args.output,
            seq_length=args.seq_length,
            max_samples=args.max_samples,
            seed=args.seed,
            force=args.force,
            rows=args.rows,
            train_reasoning=args.train_reasoning,
            train_after_end_of_turn=args.train_after_end_of_turn,
            opening_assistant=args.opening_assistant,
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
