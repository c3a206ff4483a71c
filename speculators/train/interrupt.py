"""SIGTERM/SIGINT as a request to stop after the current optimizer step.

A cancel from the dashboard (SIGTERM to the process it started), `kill`, Ctrl-C or
torchrun forwarding a signal to its workers would otherwise lose everything since the
last checkpoint.  Inside `StopRequest` the first such signal only records its number;
the training loop checkpoints the step it is on and returns.  A second signal exits at
once (the checkpoint being written is atomic, so nothing half-written is resumed).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: installs the handlers (main thread only) and restores the old ones."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
