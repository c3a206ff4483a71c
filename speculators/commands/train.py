"""`speculators train`: train an EAGLE-3 draft (see docs/training.md)."""

from __future__ import annotations


def register(subparsers) -> None:
    from speculators.train.cli import add_train_arguments

    p = subparsers.add_parser(
        "train",
        help="train an EAGLE-3 draft model on verifier hidden states",
        description="Train an EAGLE-3 draft. Multi-process: torchrun --nproc_per_node N -m speculators.train ...",
    )
    add_train_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from speculators.train.cli import run_from_args

    return run_from_args(args)
