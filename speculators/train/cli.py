"""Flags of `speculators train` (also `python -m speculators.train` and under torchrun).

Every flag is derived from `TrainConfig` (speculators.config.train): its name, default,
help, choices and bounds live there, once. Flag names follow the public speculators
training script.
"""

from __future__ import annotations

import argparse

from speculators.config.base import add_arguments
from speculators.config.train import TrainConfig


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The parsed flags as a checked TrainConfig (bad values: one UserError naming each flag)."""
    values = {k: getattr(args, k) for k in TrainConfig.model_fields if hasattr(args, k)}
    return TrainConfig(**values)


def run_from_args(args: argparse.Namespace) -> int:
    from speculators.config.memory import check_train_memory
    from speculators.train.trainer import run_training

    cfg = config_from_args(args)
    check_train_memory(cfg)
    result = run_training(cfg)
    # Stopped by SIGTERM/SIGINT (after checkpointing): not a success, the shell's code for it.
    return 128 + result.signal if result.signal else 0
