"""`speculators convert-data`: per-sample .pt files -> sharded safetensors (faster loading)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-data",
        help="convert datagen .pt output to the sharded safetensors layout",
        description=(
            "Reads DIR/data_<i>.pt + data_config.json and writes shards/shard_<k>.safetensors + "
            "data_config.json (format: safetensors) to --output-dir. Training reads either layout."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-path", required=True, help="datagen output directory (format pt)")
    p.add_argument("--output-dir", required=True, help="new directory for the shards")
    p.add_argument("--shard-tokens", type=int, default=1 << 20,
                   help="start a new shard after this many tokens")
    p.add_argument("--on-corrupt", choices=["skip", "raise"], default="skip",
                   help="what to do with an unreadable sample file")
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.data.formats import convert_pt_to_safetensors

    config = convert_pt_to_safetensors(
        args.data_path, args.output_dir, shard_tokens=args.shard_tokens, on_corrupt=args.on_corrupt
    )
    n = sum(len(s["sample_index"]) for s in config["shards"])
    skipped = len(config.get("skipped_corrupt", []))
    print(
        f"convert-data: {n} samples in {len(config['shards'])} shard(s) -> {args.output_dir}"
        + (f" ({skipped} corrupt skipped)" if skipped else "")
    )
    return 0
