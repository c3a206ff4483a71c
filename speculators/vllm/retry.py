"""Retries with exponential backoff and a bounded total wait.

A vLLM server that is starting, restarting or briefly overloaded answers with
connection errors or 5xx; those are retried until ``max_wait_s`` has passed, then
`ServerUnavailableError` says which endpoint did not answer and what to check.
Everything else (a 4xx, a malformed response) fails at once: retrying would not
change the answer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from speculators.errors import UserError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ServerUnavailableError(UserError):
    """The server did not answer within the bounded wait."""


class TransientServerError(Exception):
    """A failure worth retrying (connection refused, timeout, 5xx, 408, 429)."""


class InvalidResponseError(UserError):
    """The server answered, but not with what the protocol promises; never retried."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff ``initial_backoff_s * multiplier**k`` capped at ``max_backoff_s``,
    giving up once ``max_wait_s`` seconds have passed since the first attempt."""

    max_wait_s: float = 300.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 15.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    hint: str = "",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``fn`` until it succeeds, retrying `TransientServerError` within the policy.

    ``what`` names the call in messages (e.g. ``POST http://h:8000/v1/completions``);
    ``hint`` is appended to the final error to say what to do.
    """
    start = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except TransientServerError as exc:
            waited = clock() - start
            delay = policy.backoff(attempt)
            if waited + delay > policy.max_wait_s:
                raise ServerUnavailableError(
                    f"{what} failed {attempt} time(s) over {waited:.1f}s "
                    f"(bounded wait {policy.max_wait_s:g}s); last error: {exc}"
                    + (f". {hint}" if hint else "")
                ) from exc
            logger.warning("%s failed (attempt %d): %s; retrying in %.1fs", what, attempt, exc, delay)
            sleep(delay)
