"""The sink's acceptance line says what the measurement cost in training steps: its seconds over
the median wall time of the recent optimizer steps (each step's tokens over its tokens/s)."""

from __future__ import annotations

import logging
import statistics

import pytest

from speculators.metric_records import AcceptanceRecord, TrainRecord
from speculators.train.loggers import ExperimentLogger
from speculators.train.sink import STEP_WINDOW, MetricsSink


def _train(step: int, tokens: int, seconds: float) -> TrainRecord:
    return TrainRecord(epoch=0, step=step, total_steps=1000,
                       metrics={"loss": 1.0, "lr": 1e-3, "tokens": tokens, "tokens_per_s": tokens / seconds})


def test_acceptance_cost_in_recent_steps(tmp_path, caplog):
    sink = MetricsSink(tmp_path / "m.jsonl", ExperimentLogger(None, str(tmp_path), "r", {}), log_freq=1000,
                       is_main=True)
    # more steps than the window, slow ones first: only the recent ones count
    times = [5.0] * 10 + [0.1 * (1 + i % 7) for i in range(STEP_WINDOW)]
    for i, t in enumerate(times):
        sink.emit(_train(i + 1, 64 + i, t))
    with caplog.at_level(logging.INFO, logger="speculators.train"):
        sink.emit(AcceptanceRecord(epoch=0, step=len(times), mean_acceptance_length=2.5,
                                   acceptance_rate_per_position=[0.9, 0.6], prompts=8, tokens=256, seconds=3.0))
    (line,) = [r.getMessage() for r in caplog.records if "acceptance/" in r.getMessage()]
    fields = dict(part.split("=") for part in line.split(", "))
    expected = 3.0 / statistics.median(times[-STEP_WINDOW:])
    assert float(fields["acceptance/cost_steps"]) == pytest.approx(expected, rel=1e-3)


def test_no_cost_before_any_step(tmp_path, caplog):
    sink = MetricsSink(tmp_path / "m.jsonl", ExperimentLogger(None, str(tmp_path), "r", {}), log_freq=1, is_main=True)
    with caplog.at_level(logging.INFO, logger="speculators.train"):
        sink.emit(AcceptanceRecord(epoch=0, step=0, mean_acceptance_length=1.0, acceptance_rate_per_position=[0.0],
                                   prompts=1, tokens=4, seconds=1.0))
    (line,) = [r.getMessage() for r in caplog.records if "acceptance/" in r.getMessage()]
    assert "cost_steps" not in line
