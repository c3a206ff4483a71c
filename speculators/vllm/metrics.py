"""Read vLLM's speculative-decoding counters from its Prometheus ``/metrics``.

vLLM exports (Prometheus counters, so the text format adds ``_total``):
``vllm:spec_decode_num_drafts``, ``vllm:spec_decode_num_draft_tokens``,
``vllm:spec_decode_num_accepted_tokens`` and
``vllm:spec_decode_num_accepted_tokens_per_pos{position="i"}``, each labelled per
engine and ``model_name`` (the verifier's path or id, not the served model id);
we sum over engines, and over models unless ``--model-name`` picks one.
"""

from __future__ import annotations

from typing import Any

from speculators.errors import UserError
from speculators.evaluate.report import SpecDecodeCounts, build_report
from speculators.vllm.launch import auth_headers

PREFIX = "vllm:spec_decode_"


def parse_prometheus_text(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples ``(name, labels, value)`` of a Prometheus text body (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return [
            (sample.name, dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
    except ValueError as exc:
        raise UserError(f"the server's /metrics is not in the Prometheus text format ({exc})") from exc


def _base(name: str) -> str | None:
    if not name.startswith(PREFIX) or name.endswith("_created"):
        return None
    short = name[len(PREFIX) :]
    return short[: -len("_total")] if short.endswith("_total") else short


def spec_decode_counts(text: str, model_name: str | None = None) -> SpecDecodeCounts:
    """Sum the spec-decode counters of a ``/metrics`` body over engines (and models, unless
    ``model_name`` picks one). vLLM labels them ``model_name=<the verifier's path or id>``,
    not the served model id."""
    totals = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0}
    per_pos: dict[int, float] = {}
    seen = False
    names: set[str] = set()
    for name, labels, value in parse_prometheus_text(text):
        base = _base(name)
        if base is None:
            continue
        names.add(labels.get("model_name", ""))
        if model_name is not None and labels.get("model_name") != model_name:
            continue
        if base == "num_accepted_tokens_per_pos":
            pos = int(labels.get("position", "0"))
            per_pos[pos] = per_pos.get(pos, 0.0) + value
            seen = True
        elif base in totals:
            totals[base] += value
            seen = True
    if not seen and names and model_name is not None:
        raise UserError(
            f"the server's spec-decode counters carry model_name {sorted(names)}, not {model_name!r}; "
            "pass one of those to --model-name (vLLM labels them with the verifier), or leave it out"
        )
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


def scrape(endpoint: str, timeout_s: float = 10.0, api_key: str | None = None) -> str:
    """GET ``/metrics`` from a server (``http://host:port``)."""
    import requests

    from speculators.vllm.client import normalize_endpoint

    url = normalize_endpoint(endpoint) + "/metrics"
    try:
        resp = requests.get(url, timeout=timeout_s, headers=auth_headers(api_key))
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
    model_name: str | None = None,
    concurrency: int = 8,
    timeout_s: float = 600.0,
    api_key: str | None = None,
    streams: list[dict[str, Any]] | None = None,
    categories: list[str] | None = None,
) -> dict[str, Any]:
    """Send ``prompts`` (token ids) to a serving vLLM and report the spec-decode counters
    accumulated meanwhile (the difference of two ``/metrics`` scrapes).

    Other traffic on the server during the run is counted too; use a quiet server.
    ``streams``: a list that gets, per prompt in order, the prompt ids the server decoded
    from and the ids it generated (``return_token_ids``; the ids sent when the server does
    not return them). ``categories`` (one per prompt): the prompts are sent one category
    after another, with a scrape between, and the report gets per-category figures
    (the counters are server-wide, so a category's counts are the difference around it).
    """
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from speculators.evaluate.report import category_figures, group_by_category, sum_counts
    from speculators.vllm.client import normalize_endpoint

    base = normalize_endpoint(endpoint)
    headers = auth_headers(api_key)
    try:
        model = requests.get(base + "/v1/models", timeout=30, headers=headers).json()["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"cannot list models at {base}/v1/models ({exc}); check --vllm-endpoint / --api-key") from exc

    def send(prompt: list[int]) -> tuple[int, dict[str, Any]]:
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": temperature,
                "return_token_ids": True}
        resp = requests.post(base + "/v1/completions", json=body, timeout=timeout_s, headers=headers)
        if resp.status_code != 200:
            raise UserError(f"POST {base}/v1/completions -> HTTP {resp.status_code}: {resp.text[:300]}")
        data = resp.json()
        choice = (data.get("choices") or [{}])[0]
        stream = {"prompt_ids": choice.get("prompt_token_ids") or data.get("prompt_token_ids") or list(prompt),
                  "tokens": choice.get("token_ids")}
        return int(data.get("usage", {}).get("completion_tokens", 0)), stream

    groups = group_by_category(categories) if categories is not None else {"": list(range(len(prompts)))}
    results: list[tuple[int, dict[str, Any]] | None] = [None] * len(prompts)
    by_group: dict[str, tuple[int, SpecDecodeCounts]] = {}
    with ThreadPoolExecutor(max(1, min(concurrency, len(prompts)))) as pool:
        for name, idx in groups.items():
            before = spec_decode_counts(scrape(base, api_key=api_key), model_name)
            for i, result in zip(idx, pool.map(send, [prompts[i] for i in idx])):
                results[i] = result
            after = spec_decode_counts(scrape(base, api_key=api_key), model_name)
            by_group[name] = (len(idx), after.minus(before))
    generated = sum(r[0] for r in results if r is not None)
    if streams is not None:
        streams.extend(r[1] for r in results if r is not None)
    extra: dict[str, Any] = {}
    total = sum_counts([c for _, c in by_group.values()])
    if categories is not None:
        k = max(len(c.accepted_per_pos) for _, c in by_group.values())
        extra["categories"] = category_figures(by_group, k)
    return build_report(
        total, source="vllm", endpoint=base, model=model, num_prompts=len(prompts),
        generated_tokens=generated, temperature=temperature, max_new_tokens=max_new_tokens, **extra,
    )
