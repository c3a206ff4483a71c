"""Console logging in one format for every command (train, datagen, regenerate, eval, ...).

A record reads like the public speculators scripts' logs:

    [20:17:13] INFO     train/loss_0=1.980, train/full_acc_0=0.029, ..., epoch=0, lr=2.47e-05  trainer.py:191

time, level, the message, the source `file:line`. On a terminal the `file:line` is
right-aligned to the terminal's width (long messages wrap under the message column) and
parts are coloured; anywhere else (a pipe, a file, the dashboard's stage logs) the line is
plain text, the `file:line` appended after the message. `setup_logging` is the one place a
process installs it; `format_fields` the one number format for `key=value` lines.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import textwrap
import time
from collections.abc import Mapping
from typing import IO, Any

LEVEL_WIDTH = 8
_RESET = "\x1b[0m"
_STYLE = {
    "time": "\x1b[2;36m",     # dim cyan
    "where": "\x1b[2m",       # dim
    "value": "\x1b[1;36m",    # bold cyan
    "DEBUG": "\x1b[32m",
    "INFO": "\x1b[34m",
    "WARNING": "\x1b[31m",
    "ERROR": "\x1b[1;31m",
    "CRITICAL": "\x1b[1;7;31m",
}


def format_value(value: Any) -> str:
    """Compact numbers: 0 and magnitudes below 0.01 as `9.45e-04` (3 significant digits),
    others with 3 decimals (`1.980`), 1000 and above with one (`6543.2`); ints as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    size = abs(value)
    if size < 0.01:
        return f"{value:.2e}"
    if size < 1000:
        return f"{value:.3f}"
    return f"{value:.1f}"


def format_fields(fields: Mapping[str, Any]) -> str:
    """`a=1.980, b=9.45e-04, epoch=0`: the comma-separated fields of a metrics line."""
    return ", ".join(f"{key}={format_value(value)}" for key, value in fields.items())


def _paint(text: str, style: str, color: bool) -> str:
    return f"{_STYLE[style]}{text}{_RESET}" if color and style in _STYLE and text else text


_FIELD = re.compile(r"([\w/.\-]+)=([^\s,]+)")


def _paint_values(text: str, color: bool) -> str:
    """Colour the value of each `key=value` field (numbers and words alike)."""
    if not color:
        return text
    return _FIELD.sub(lambda m: f"{m.group(1)}={_paint(m.group(2), 'value', True)}", text)


def render(record: logging.LogRecord, *, color: bool = False, width: int | None = None) -> str:
    """One record as text. `width` (a terminal's columns) right-aligns `file:line` and wraps
    the message under its column; None appends `file:line` after the message (files, pipes)."""
    message = record.getMessage()
    if record.exc_info:
        message = f"{message}\n{logging.Formatter().formatException(record.exc_info)}"
    if record.stack_info:
        message = f"{message}\n{record.stack_info}"
    when = f"[{time.strftime('%H:%M:%S', time.localtime(record.created))}]"
    level = record.levelname
    where = f"{record.filename}:{record.lineno}"
    indent = " " * (len(when) + 1 + LEVEL_WIDTH + 1)
    lines = message.splitlines() or [""]
    avail = None if width is None else width - len(indent) - len(where) - 1
    if avail is not None and avail >= 20:
        wrapped: list[str] = []
        for line in lines:
            wrapped.extend(textwrap.wrap(line, avail, break_long_words=False, break_on_hyphens=False,
                                         drop_whitespace=True) or [""])
        lines = wrapped
        gap = " " * max(1, width - len(indent) - len(lines[0]) - len(where))
    else:
        gap = "  "
    head = f"{_paint(when, 'time', color)} {_paint(level.ljust(LEVEL_WIDTH), level, color)} "
    first = f"{head}{_paint_values(lines[0], color)}{gap}{_paint(where, 'where', color)}"
    return "\n".join([first, *(indent + _paint_values(line, color) for line in lines[1:])])


class ConsoleFormatter(logging.Formatter):
    """`render` as a logging.Formatter (fixed colour and width), for handlers of one's own."""

    def __init__(self, color: bool = False, width: int | None = None):
        super().__init__()
        self.color, self.width = color, width

    def format(self, record: logging.LogRecord) -> str:
        return render(record, color=self.color, width=self.width)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def wants_color(stream: IO[str]) -> bool:
    """Colour on a terminal only; `NO_COLOR` (any value) turns it off, `FORCE_COLOR` on."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return _isatty(stream) and os.environ.get("TERM") != "dumb"


def terminal_width(stream: IO[str]) -> int | None:
    """Columns of the terminal `stream` writes to; None when it is not a terminal."""
    if not _isatty(stream):
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size().columns  # honours $COLUMNS


class ConsoleHandler(logging.Handler):
    """Writes `render`ed records to a stream, by default whatever `sys.stdout` is at the time
    (so a redirected or captured stdout is honoured); colour and width follow that stream."""

    def __init__(self, stream: IO[str] | None = None, color: bool | None = None):
        super().__init__()
        self._stream, self.color = stream, color

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stdout

    def format(self, record: logging.LogRecord) -> str:
        stream = self.stream
        color = wants_color(stream) if self.color is None else self.color
        return render(record, color=color, width=terminal_width(stream))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


def setup_logging(level: int | str = "INFO", stream: IO[str] | None = None, color: bool | None = None) -> ConsoleHandler:
    """Install the console handler on the root logger (replacing one installed before), so
    every `logging.getLogger(...)` in the process prints in the one format."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(old)
    handler = ConsoleHandler(stream, color)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
