"""Find the line of a server log that says why it died.

A vLLM start that fails prints 100-200 lines: the real cause (``ValueError: Available
memory ... is less than desired``, ``OSError: [Errno 98] Address already in use``) sits in
the middle, followed by the engine's wrapper exceptions ("Engine core initialization
failed. See root cause above") and shutdown noise. The last lines of the log are therefore
the wrong thing to show; this module picks the cause.
"""

from __future__ import annotations

import re
from typing import Iterable

# Causes worth naming whatever else the log says; the first one found wins.
KNOWN_CAUSES = (
    "less than desired",
    "less than requested memory",
    "Address already in use",
    "out of memory",
    "Cannot allocate memory",
    "No space left on device",
    "Illegal instruction",
)
# Exceptions that only wrap the real one.
_WRAPPERS = ("See root cause above", "Engine core initialization failed", "EngineDeadError",
             "Engine process failed to start", "SystemExit", "KeyboardInterrupt")
# vLLM prefixes: "(EngineCore_DP0 pid=4242) " and "ERROR 12-07 09:30:01 [core.py:708] "
_PROCESS = re.compile(r"^\s*\([\w.-]+ pid=\d+\)\s*")
_LEVEL = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d [\d:.]+\s+\[[^\]]*\]\s*")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?$")
MAX_CHARS = 600


def clean(line: str) -> str:
    """The line without vLLM's process and log-level prefixes."""
    line = _PROCESS.sub("", line.rstrip())
    return _LEVEL.sub("", line).strip()


def cause_line(lines: Iterable[str]) -> str | None:
    """The most telling line: a known cause, else our CLI's last ``error:`` line (without
    that prefix), else the last exception line that is not a wrapper; None when the log
    names no cause."""
    cleaned = [clean(raw) for raw in lines]
    for line in cleaned:
        if any(k.lower() in line.lower() for k in KNOWN_CAUSES):
            return _unprefixed(line)[:MAX_CHARS]
    errors = [line for line in cleaned if line.startswith("error:")]
    if errors:
        return _unprefixed(errors[-1])[:MAX_CHARS]
    exceptions = [line for line in cleaned if _EXCEPTION.match(line) and not any(w in line for w in _WRAPPERS)]
    if exceptions:
        return exceptions[-1][:MAX_CHARS]
    return None


def _unprefixed(line: str) -> str:
    return line[len("error:"):].strip() if line.startswith("error:") else line


def looks_like_a_broken_install(line: str | None) -> bool:
    """Whether the cause is vLLM itself failing to import (what `make vllm` fixes)."""
    return bool(line) and any(k in line for k in ("ImportError", "ModuleNotFoundError", "undefined symbol",
                                                  "cannot import name"))
