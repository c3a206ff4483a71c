"""Helpers shared by the training tests (a plain module: test modules do not import each other)."""

from __future__ import annotations

from pathlib import Path

from speculators.train.config import TrainConfig
from speculators.train.metrics_stream import read_metrics
from speculators.train.trainer import run_training


def make_cfg(verifier, data, save, **kw) -> TrainConfig:
    """A small CPU run: 2 epochs of 64-token rows, 2 TTT steps, a quarter held out."""
    base = dict(
        verifier_name_or_path=str(verifier), data_path=str(data), save_path=str(save), epochs=2, lr=2e-3,
        total_seq_len=64, ttt_steps=2, log_freq=1000, train_data_ratio=0.75, warmup_steps=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def train_losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["metrics"]["loss"] for r in read_metrics(Path(save) / "metrics.jsonl") if r["type"] == "train"}


def train_losses_of(verifier, data, save, **kw) -> dict[int, float]:
    run_training(make_cfg(verifier, data, save, epochs=2, **kw))
    return train_losses(save)
