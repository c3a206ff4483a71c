"""`speculators convert-data`: move hidden-state data between layouts.

Ours: ``pt`` (data_<i>.pt, what datagen writes) and ``safetensors`` (shards, faster
loading). The public speculators package's: ``public`` (hidden_states/hs_<i>.safetensors
beside an arrow dataset). Training and eval read all three directly; converting is for
speed (safetensors) or for handing data to the other package.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def _layer_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-data",
        help="convert hidden-state data between our layouts and the public speculators package's",
        description=(
            "Reads --data-path in any supported layout (detected) and writes --output-dir in the "
            "layout --to names: safetensors (our shards), pt (our per-sample files) or public "
            "(the public speculators package: hidden_states/hs_<i>.safetensors + arrow dataset)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-path", required=True, help="hidden-state data directory (pt, safetensors or public layout)")
    p.add_argument("--output-dir", required=True, help="new directory for the converted data")
    p.add_argument("--to", choices=["safetensors", "pt", "public"], default="safetensors",
                   help="layout to write")
    p.add_argument("--shard-tokens", type=int, default=1 << 20,
                   help="safetensors: start a new shard after this many tokens")
    p.add_argument("--layer-ids", type=_layer_ids, default=None,
                   help="from the public layout: the verifier layer ids its files hold, final layer last "
                        "(needed unless our converter wrote them beside the data)")
    p.add_argument("--num-hidden-layers", type=int, default=None,
                   help="from the public layout: the verifier's layer count, recorded for checks")
    p.add_argument("--on-corrupt", choices=["skip", "raise"], default="skip",
                   help="what to do with an unreadable sample file")
    p.add_argument("--data-format-version", type=int, choices=[0, 1], default=1,
                   help="layout of --data-path's data_<i>.pt files: 1 = what datagen writes (a list of "
                        "hidden_states), 0 = the older layout (hidden_state = aux layers concatenated, target = "
                        "final layer); --to pt from version 0 rewrites it as version 1")
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.data import data_config as dc
    from speculators.data.formats import convert_pt_to_safetensors, convert_v0_to_pt, read_data_config
    from speculators.data.public_convert import convert_from_public, convert_to_public
    from speculators.data.public_format import is_public_layout
    from speculators.errors import UserError

    src, dst = Path(args.data_path), Path(args.output_dir)
    public_src = args.data_format_version == 1 and is_public_layout(src)
    if args.data_format_version == 0 and args.to == "pt":
        config = convert_v0_to_pt(src, dst, on_corrupt=args.on_corrupt)
        n = config["num_samples"]
    elif args.data_format_version == 0 and args.to != "safetensors":
        raise UserError("--data-format-version 0: convert with --to pt (or --to safetensors) first")
    elif args.to == "public":
        config = convert_to_public(src, dst, on_corrupt=args.on_corrupt)
        n = len(config["source_sample_index"])
    elif public_src and args.to == "pt":
        config = convert_from_public(src, dst, args.layer_ids, args.num_hidden_layers, args.on_corrupt)
        n = config["num_samples"]
    elif public_src:  # public -> pt (staged) -> safetensors shards
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=dst.parent if dst.parent.exists() else None) as tmp:
            staged = Path(tmp) / "pt"
            convert_from_public(src, staged, args.layer_ids, args.num_hidden_layers, args.on_corrupt)
            config = convert_pt_to_safetensors(staged, dst, shard_tokens=args.shard_tokens, on_corrupt="raise")
            config["converted_from"] = str(src)
            dc.write(dst / "data_config.json", config)
        n = sum(len(s["sample_index"]) for s in config["shards"])
    elif args.to == "safetensors":
        config = convert_pt_to_safetensors(src, dst, shard_tokens=args.shard_tokens, on_corrupt=args.on_corrupt,
                                           data_format_version=args.data_format_version)
        n = sum(len(s["sample_index"]) for s in config["shards"])
    else:
        fmt = read_data_config(src).get("format", "pt")
        raise UserError(f"--data-path {src} is already in our {fmt} layout; --to pt converts from the public layout")
    skipped = len(config.get("skipped_corrupt", []))
    print(f"convert-data: {n} samples -> {dst} ({args.to})" + (f" ({skipped} corrupt skipped)" if skipped else ""))
    return 0
