"""`speculators datagen`: run the verifier offline and save its hidden states.

Flags, defaults, help and bounds come from `DatagenConfig` (speculators.config.datagen).
"""

from __future__ import annotations

from speculators.config.base import add_arguments
from speculators.config.datagen import DatagenConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "datagen",
        help="generate verifier hidden states for a prepared dataset (resumable)",
        description=(
            "Runs the verifier over the prepared dataset and writes DIR/data_<i>.pt (or safetensors "
            "shards), DIR/token_freq.pt and DIR/data_config.json. A --train-data-path that is not a "
            "prepare-data output (sharegpt, ultrachat, a .jsonl, a hub id) is prepared first and cached "
            "under --cache-dir by fingerprint. Rerunning skips finished samples. Layer id i < n is "
            "the residual stream entering decoder layer i; id n is the final layer before the norm. "
            "Arguments after a bare -- go to the backend (vLLM engine args)."
        ),
    )
    add_arguments(p, DatagenConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.datagen.runner import run_datagen

    result = run_datagen(DatagenConfig.from_args(args, extra_args=list(getattr(args, "passthrough", []) or [])))
    print(
        f"datagen: {result.total} samples ({result.generated} generated, {result.skipped_existing} "
        f"already done) -> {result.output_dir} [{result.seconds:.1f}s, {result.tokens_per_s:.0f} tok/s]"
    )
    return 0
