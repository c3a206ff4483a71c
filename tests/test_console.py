"""The one log format (speculators/console.py): the seeds' shape, colour only on a terminal,
`file:line` right-aligned to the terminal's width, plain text in files and pipes."""

from __future__ import annotations

import io
import logging
import re

import pytest

from speculators.console import ConsoleHandler, format_fields, format_value, render, setup_logging

ANSI = re.compile(r"\x1b\[[0-9;]*m")
NUM = r"-?(?:\d+\.\d{3}|\d\.\d{2}e[-+]\d{2}|\d+\.\d|\d+)"
# one metrics line as the seeds show it: time, level, `prefix/key=value` fields, epoch, lr, file:line
METRICS_LINE = re.compile(
    rf"^\[\d\d:\d\d:\d\d\] INFO {{5}}(?P<prefix>train|val)/loss_0={NUM}"
    rf"(?:, (?P=prefix)/[a-z_]+(?:_\d+)?={NUM})*, epoch=\d+(?:, lr={NUM})? {{2,}}[\w.]+\.py:\d+$"
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(msg: str, level=logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("speculators.train", level, "/x/speculators/train/trainer.py", 191, msg, None, None)


def test_the_seeds_line_has_the_shape_the_tests_check():
    # the public package's documented line (fields shortened), to pin the regex to the source
    seeds = ("[20:17:13] INFO     train/loss_0=1.980, train/full_acc_0=0.029, train/cond_acc_0=0.029, "
             "train/loss_1=1.970, train/full_acc_1=9.45e-04, train/cond_acc_1=0.033, "
             "train/full_acc_2=0.00e+00, train/loss=5.965, epoch=0, lr=2.47e-05             trainer.py:191")
    assert METRICS_LINE.match(seeds)


@pytest.mark.parametrize("value, text", [
    (1.98, "1.980"), (0.029, "0.029"), (9.45e-4, "9.45e-04"), (0.0, "0.00e+00"), (2.47e-05, "2.47e-05"),
    (5.965, "5.965"), (0.00512, "5.12e-03"), (0.0123, "0.012"), (6543.21, "6543.2"), (-0.5, "-0.500"), (3, "3"), (float("nan"), "nan"),
])
def test_numbers_are_compact_as_the_seeds_print_them(value, text):
    assert format_value(value) == text


def test_plain_record_appends_file_and_line():
    line = render(_record(format_fields({"train/loss_0": 1.98, "train/full_acc_1": 9.45e-4, "epoch": 0,
                                         "lr": 2.47e-05})))
    assert "\x1b" not in line
    assert re.match(r"^\[\d\d:\d\d:\d\d\] INFO     train/loss_0=1\.980, train/full_acc_1=9\.45e-04, "
                    r"epoch=0, lr=2\.47e-05  trainer\.py:191$", line)
    assert METRICS_LINE.match(line)


def test_forced_tty_colours_and_right_aligns(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "120")
    tty = _Tty()
    handler = ConsoleHandler(tty)
    handler.emit(_record("train/loss_0=1.980, epoch=0"))
    handler.emit(_record(", ".join(f"train/m_{i}=0.123" for i in range(20))))  # longer than the terminal
    handler.emit(_record("disk almost full", logging.WARNING))
    out = tty.getvalue()
    assert "\x1b[" in out and "\x1b[1;36m1.980\x1b[0m" in out  # values and levels coloured
    plain = ANSI.sub("", out).splitlines()
    assert len(plain[0]) == 120 and plain[0].endswith(" trainer.py:191")  # right-aligned to the width
    long = [ln for ln in plain if "m_" in ln]
    assert len(long) > 1 and all(len(ln) <= 120 for ln in long)
    assert long[0].endswith("trainer.py:191") and long[1].startswith(" " * 20 + "train/m_")  # wrapped under the message
    assert {m for ln in long for m in re.findall(r"m_\d+", ln)} == {f"m_{i}" for i in range(20)}
    # the same records to a pipe: no escape codes, file:line right after the message
    pipe = io.StringIO()
    ConsoleHandler(pipe).emit(_record("train/loss_0=1.980, epoch=0"))
    assert "\x1b" not in pipe.getvalue() and pipe.getvalue().rstrip().endswith("epoch=0  trainer.py:191")


def test_no_color_and_force_color(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    tty = _Tty()
    ConsoleHandler(tty).emit(_record("a=1"))
    assert "\x1b" not in tty.getvalue()
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    pipe = io.StringIO()
    ConsoleHandler(pipe).emit(_record("a=1"))
    assert "\x1b[" in pipe.getvalue()


def test_multiline_and_exceptions_stay_under_the_message():
    try:
        raise ValueError("bad value")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, "/a/b/runner.py", 7, "two\nlines", None, sys.exc_info())
    lines = render(rec).splitlines()
    assert lines[0].endswith("ERROR    two  runner.py:7") and lines[1] == " " * 20 + "lines"
    assert lines[-1].strip() == "ValueError: bad value" and lines[-1].startswith(" " * 20)


def test_setup_logging_installs_one_handler_for_every_logger(capsys):
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        setup_logging("INFO")
        setup_logging("DEBUG")  # again (a second main() in one process): still one handler
        assert sum(isinstance(h, ConsoleHandler) for h in root.handlers) == 1 and root.level == logging.DEBUG
        logging.getLogger("speculators.data.prepare").info("prepared %d samples", 20)
        out = capsys.readouterr().out  # the handler writes to whatever stdout is now
        assert re.match(r"^\[\d\d:\d\d:\d\d\] INFO     prepared 20 samples  test_console\.py:\d+$", out.strip())
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])


def test_the_celery_worker_logs_in_the_same_format(tmp_path):
    """A receiver of Celery's `setup_logging` signal replaces Celery's own log setup."""
    from celery import signals

    import worker.celery_app  # noqa: F401  (connects the receiver)

    root = logging.getLogger()
    before = list(root.handlers), root.level
    log = tmp_path / "worker.log"
    try:
        replies = signals.setup_logging.send(sender=None, loglevel=logging.INFO, logfile=str(log),
                                             format="", colorize=False)
        assert replies  # Celery configures nothing itself when a receiver answered
        logging.getLogger("celery.worker.consumer").info("gpu0@test ready.")
        handler = next(h for h in root.handlers if isinstance(h, ConsoleHandler))
        handler.stream.close()
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])
    assert re.match(r"^\[\d\d:\d\d:\d\d\] INFO     gpu0@test ready\.  test_console\.py:\d+$", log.read_text().strip())
