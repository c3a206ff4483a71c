"""`speculators build-vocab-mapping`: pick the draft vocabulary from token frequencies."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build-vocab-mapping",
        help="choose the D most frequent target tokens; write d2t.npy and t2d.npy",
        description=(
            "Reads token_freq.pt from prepare-data and writes DIR/d2t.npy (int64 [D], "
            "target_id = i + d2t[i]) and DIR/t2d.npy (bool [T])."
        ),
    )
    p.add_argument("--token-freq-path", required=True, help="token_freq.pt written by prepare-data")
    p.add_argument("--draft-vocab-size", type=int, required=True, help="D, the draft model's vocab size")
    group = p.add_argument_group("target vocab (one is required)")
    group.add_argument("--target-vocab-size", type=int, default=None, help="T, the verifier's vocab size")
    group.add_argument("--target-model-path", default=None, help="verifier model; T is read from its config")
    p.add_argument("--output-path", required=True, help="directory for d2t.npy and t2d.npy")
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.data.vocab import write_vocab_mapping

    d2t, t2d = write_vocab_mapping(
        args.token_freq_path,
        args.draft_vocab_size,
        args.output_path,
        target_vocab_size=args.target_vocab_size,
        target_model_path=args.target_model_path,
    )
    print(f"build-vocab-mapping: draft vocab {len(d2t)} of {len(t2d)} target tokens -> {args.output_path}")
    return 0
