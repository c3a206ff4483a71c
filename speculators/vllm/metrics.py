"""Read vLLM's speculative-decoding counters from its Prometheus ``/metrics``.

vLLM exports (Prometheus counters, so the text format adds ``_total``):
``vllm:spec_decode_num_drafts``, ``vllm:spec_decode_num_draft_tokens``,
``vllm:spec_decode_num_accepted_tokens`` and
``vllm:spec_decode_num_accepted_tokens_per_pos{position="i"}``, each labelled per
engine; we sum over engines and models.
"""

from __future__ import annotations

import re
from typing import Any

from speculators.errors import UserError
from speculators.evaluate.report import SpecDecodeCounts, build_report

PREFIX = "vllm:spec_decode_"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse_prometheus_text(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` from the Prometheus text exposition format."""
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"/metrics line {lineno} is not a Prometheus sample: {raw[:120]!r}")
        name, _, label_text, value = m.group(1), m.group(2), m.group(3), m.group(4)
        labels: dict[str, str] = {}
        if label_text:
            pos = 0
            while pos < len(label_text):
                lm = _LABEL.match(label_text, pos)
                if not lm:
                    raise ValueError(f"/metrics line {lineno}: bad labels {label_text!r}")
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
        out.append((name, labels, float(value)))
    return out


def _base(name: str) -> str | None:
    if not name.startswith(PREFIX) or name.endswith("_created"):
        return None
    short = name[len(PREFIX) :]
    return short[: -len("_total")] if short.endswith("_total") else short


def spec_decode_counts(text: str, model_name: str | None = None) -> SpecDecodeCounts:
    """Sum the spec-decode counters in a ``/metrics`` body (optionally for one ``model_name``)."""
    totals = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0}
    per_pos: dict[int, float] = {}
    seen = False
    for name, labels, value in parse_prometheus_text(text):
        base = _base(name)
        if base is None:
            continue
        if model_name is not None and labels.get("model_name", model_name) != model_name:
            continue
        if base == "num_accepted_tokens_per_pos":
            per_pos[int(labels.get("position", "0"))] = per_pos.get(int(labels.get("position", "0")), 0.0) + value
            seen = True
        elif base in totals:
            totals[base] += value
            seen = True
    if not seen:
        raise UserError(
            "the server's /metrics has no vllm:spec_decode_* counters: it is not running speculative "
            "decoding (serve a speculator with `speculators serve`)"
        )
    k = max(per_pos) + 1 if per_pos else 0
    return SpecDecodeCounts(
        int(totals["num_drafts"]),
        int(totals["num_draft_tokens"]),
        int(totals["num_accepted_tokens"]),
        [int(per_pos.get(i, 0)) for i in range(k)],
    )


def scrape(endpoint: str, timeout_s: float = 10.0) -> str:
    """GET ``/metrics`` from a server (``http://host:port``)."""
    import requests

    from speculators.vllm.client import normalize_endpoint

    url = normalize_endpoint(endpoint) + "/metrics"
    try:
        resp = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise UserError(f"cannot reach {url}: {exc}; check --vllm-endpoint") from exc
    if resp.status_code != 200:
        raise UserError(f"GET {url} -> HTTP {resp.status_code}; check --vllm-endpoint")
    return resp.text


def report_from_metrics(
    text: str, model_name: str | None = None, since: SpecDecodeCounts | None = None, **extra: Any
) -> dict[str, Any]:
    """The evaluation report from a ``/metrics`` body (minus an earlier scrape when given)."""
    counts = spec_decode_counts(text, model_name)
    if since is not None:
        counts = counts.minus(since)
    return build_report(counts, source="vllm", **extra)


def drive_and_measure(
    endpoint: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    model: str | None = None,
    concurrency: int = 8,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Send ``prompts`` (token ids) to a serving vLLM and report the spec-decode counters
    accumulated meanwhile (the difference of two ``/metrics`` scrapes).

    Other traffic on the server during the run is counted too; use a quiet server.
    """
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from speculators.vllm.client import normalize_endpoint

    base = normalize_endpoint(endpoint)
    if model is None:
        try:
            model = requests.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
        except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
            raise UserError(f"cannot list models at {base}/v1/models ({exc}); check --vllm-endpoint") from exc
    before = spec_decode_counts(scrape(base), model)

    def send(prompt: list[int]) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature}
        resp = requests.post(base + "/v1/completions", json=body, timeout=timeout_s)
        if resp.status_code != 200:
            raise UserError(f"POST {base}/v1/completions -> HTTP {resp.status_code}: {resp.text[:300]}")
        return int(resp.json().get("usage", {}).get("completion_tokens", 0))

    with ThreadPoolExecutor(max(1, min(concurrency, len(prompts)))) as pool:
        generated = sum(pool.map(send, prompts))
    after = spec_decode_counts(scrape(base), model)
    return build_report(
        after.minus(before), source="vllm", endpoint=base, model=model, num_prompts=len(prompts),
        generated_tokens=generated, temperature=temperature, max_new_tokens=max_new_tokens,
    )
