"""The one place a training run's metrics go out: `metrics.jsonl`, the experiment trackers, the console.

The trainer hands every record (the typed records of `speculators.metric_records`) to
`MetricsSink.emit`; the sink writes it to the stream, gives train, validation and acceptance
metrics to the tracker (trackio, wandb or tensorboard) and prints their console line (a train line every
`--log-freq` steps). Only rank 0 writes anything: this is the one rank guard of the output.
Console lines name the trainer's line that emitted the record (`stacklevel`), as they did when
the trainer logged them itself.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import deque
from pathlib import Path

from speculators.metric_records import AcceptanceRecord, Record, StartRecord, TrainRecord, ValRecord
from speculators.train.loggers import ExperimentLogger, metrics_line
from speculators.train.metrics_stream import MetricsStream

logger = logging.getLogger("speculators.train")
STEP_WINDOW = 50  # recent steps whose median time an acceptance measurement's cost is counted in


class MetricsSink:
    def __init__(self, path: str | os.PathLike, trackers: ExperimentLogger, log_freq: int, is_main: bool):
        self.path, self.trackers, self.log_freq, self.is_main = Path(path), trackers, log_freq, is_main
        self._stream = MetricsStream(None)
        self._step_seconds: deque[float] = deque(maxlen=STEP_WINDOW)

    def start(self, record: StartRecord) -> None:
        """Open the stream and write the start record; a resumed run first drops the records past
        its checkpoint's step (it emits them again), so every (type, step) stays unique."""
        if not self.is_main:
            return
        self._stream = MetricsStream(self.path)
        if record.resumed_step is not None:
            dropped = self._stream.drop_after(record.resumed_step)
            if dropped:
                logger.info("metrics: dropped %d records past step %d (training the checkpoint does not hold)",
                            dropped, record.resumed_step, stacklevel=2)
        self._stream.write(record)

    def emit(self, record: Record) -> None:
        if not self.is_main:
            return
        self._stream.write(record)
        if isinstance(record, TrainRecord):
            seconds = step_seconds(record.metrics)
            if seconds is not None:
                self._step_seconds.append(seconds)
            self.trackers.log("train", record.metrics, record.step)
            if record.step % self.log_freq == 0:
                logger.info("%s", metrics_line("train", record.metrics, record.epoch, record.metrics["lr"]),
                            stacklevel=2)
        elif isinstance(record, ValRecord):
            self.trackers.log("val", record.metrics, record.step)
            logger.info("%s", metrics_line("val", record.metrics, record.epoch), stacklevel=2)
        elif isinstance(record, AcceptanceRecord):
            metrics = acceptance_metrics(record, statistics.median(self._step_seconds) if self._step_seconds else None)
            self.trackers.log("acceptance", metrics, record.step)
            logger.info("%s", metrics_line("acceptance", metrics, record.epoch), stacklevel=2)

    def note(self, msg: str, *args) -> None:
        """A console line about the run (resumed, stopped), once for all ranks."""
        if self.is_main:
            logger.info(msg, *args, stacklevel=2)

    def close(self) -> None:
        self._stream.close()
        self.trackers.close()


def step_seconds(metrics: dict[str, float]) -> float | None:
    """One optimizer step's wall time from a train record (its tokens over its tokens/s)."""
    tokens, rate = metrics.get("tokens"), metrics.get("tokens_per_s")
    return float(tokens) / float(rate) if tokens and rate else None


def acceptance_metrics(record: AcceptanceRecord, median_step_s: float | None = None) -> dict[str, float]:
    """An acceptance record as the flat metrics of a tracker and the console line; with the
    median step time of the recent steps, its cost in training steps (`cost_steps`)."""
    metrics = {"mean_length": record.mean_acceptance_length}
    metrics.update({f"rate_{i}": r for i, r in enumerate(record.acceptance_rate_per_position)})
    metrics.update(prompts=record.prompts, tokens=record.tokens, seconds=record.seconds)
    if median_step_s:
        metrics["cost_steps"] = record.seconds / median_step_s
    return metrics
