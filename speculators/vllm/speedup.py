"""Measured speedup: the same prompts through a vLLM server of the verifier alone (baseline)
and one serving the speculator, at several concurrencies (`speculators eval --measure-speedup`).

Both servers are started here, one after the other (baseline, stop, speculative), with the
project's one command builder (`launch.build_vllm_command`, `serve.serve_plan`) and
`readiness.ManagedServer`; or two running servers are given. Every request is greedy with the
same ``max_tokens`` and ``ignore_eos`` (so both servers produce the same number of tokens),
timed by `loadgen`. The speculative server's spec-decode counters (`metrics`) give the
acceptance over each concurrency's requests.

The breakdown explains the ratio: at a concurrency, the baseline's time per output token is
one verifier step (every request gains one token per step); the speculative server gains
``tau`` (acceptance length) tokens per step, so its step takes ``TPOT_spec * tau``; what that
step costs beyond a verifier step is drafting K tokens plus verifying K+1 positions instead of
one. ``implied_draft_cost`` is the ``c`` that makes ``tau / (1 + K*c)`` (the report's
``speedup_at_draft_cost``) equal the measured ratio.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from speculators.errors import UserError
from speculators.vllm.launch import VllmCommand, auth_headers, build_vllm_command, flag_value
from speculators.vllm.loadgen import run_load, served_model, summarize
from speculators.vllm.metrics import drive_and_measure, report_from_metrics, scrape, spec_decode_counts

SPEEDUP_VERSION = 1


@dataclass(frozen=True)
class LoadSettings:
    concurrencies: tuple[int, ...] = (1, 4)
    max_tokens: int = 64
    ignore_eos: bool = True
    timeout_s: float = 600.0
    warmup_requests: int = 1


def parse_concurrencies(text: str) -> tuple[int, ...]:
    """``"1,4"`` -> ``(1, 4)``; each >= 1."""
    try:
        values = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserError(f"--concurrency {text!r}: comma-separated whole numbers, e.g. 1,4") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--concurrency {text!r}: each must be >= 1")
    return values


def measure_server(base: str, prompts: Sequence[list[int]], load: LoadSettings, api_key: str | None = None,
                   speculative: bool = False, model_name: str | None = None,
                   categories: list[str] | None = None) -> dict[str, Any]:
    """Warm the server up, then run every prompt at each concurrency; with ``speculative`` each
    level gets the acceptance its requests added to the counters, and the whole run's report;
    with ``categories`` too, one more pass, category by category, as `eval --vllm-endpoint
    --data` sends them (stopping at end of sequence), gives the acceptance per category."""
    headers = auth_headers(api_key)
    model = served_model(base, headers)
    if load.warmup_requests:
        run_load(base, model, list(prompts[: load.warmup_requests]), load.max_tokens, 1, headers, load.timeout_s,
                 load.ignore_eos)
    start = spec_decode_counts(scrape(base, api_key=api_key), model_name) if speculative else None
    levels = []
    for c in load.concurrencies:
        before = spec_decode_counts(scrape(base, api_key=api_key), model_name) if speculative else None
        timings = run_load(base, model, list(prompts), load.max_tokens, c, headers, load.timeout_s, load.ignore_eos)
        failed = [t.error for t in timings if t.error]
        if failed:
            raise UserError(f"{len(failed)} of {len(timings)} requests to {base} failed at concurrency {c}: "
                            f"{failed[0]}")
        level = summarize(timings, c)
        if speculative:
            level["acceptance"] = _acceptance(report_from_metrics(scrape(base, api_key=api_key), model_name,
                                                                  since=before))
        levels.append(level)
    out: dict[str, Any] = {"endpoint": base, "model": model, "levels": levels}
    if speculative:
        out["acceptance_report"] = report_from_metrics(scrape(base, api_key=api_key), model_name, since=start)
        if categories is not None:
            out["categories"] = drive_and_measure(base, list(prompts), load.max_tokens, 0.0, model_name,
                                                  concurrency=max(load.concurrencies), timeout_s=load.timeout_s,
                                                  api_key=api_key, categories=categories)["categories"]
    return out


def _acceptance(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "mean_acceptance_length",
            "acceptance_rate_per_position", "draft_acceptance_rate")
    return {k: report[k] for k in keys}


def compare_level(base: dict[str, Any], spec: dict[str, Any], k: int) -> dict[str, Any]:
    """Ratios and the step breakdown of one concurrency (see the module docstring)."""
    tau = spec["acceptance"]["mean_acceptance_length"]
    ratio = spec["output_tokens_per_s"] / base["output_tokens_per_s"] if base["output_tokens_per_s"] else None
    b_tpot, s_tpot = base["tpot_ms"]["mean"], spec["tpot_ms"]["mean"]
    b_ttft, s_ttft = base["ttft_ms"]["mean"], spec["ttft_ms"]["mean"]
    out: dict[str, Any] = {
        "concurrency": base["concurrency"],
        "measured_speedup": ratio,
        "tpot_speedup": b_tpot / s_tpot if b_tpot and s_tpot else None,
        "ttft_ratio": s_ttft / b_ttft if b_ttft and s_ttft else None,
        "ideal_speedup": tau,
        "mean_acceptance_length": tau,
    }
    if b_tpot and s_tpot:
        step = s_tpot * tau
        out["breakdown"] = {
            "verifier_step_ms": b_tpot,
            "speculative_step_ms": step,
            "tokens_per_speculative_step": tau,
            "draft_and_verify_overhead_ms": step - b_tpot,
            "overhead_in_verifier_steps": (step - b_tpot) / b_tpot,
        }
    if ratio:
        out["implied_draft_cost"] = (tau / ratio - 1.0) / k if k else None
    return out


def build_speedup_report(baseline: dict[str, Any], speculative: dict[str, Any], load: LoadSettings,
                         num_prompts: int, **extra: Any) -> dict[str, Any]:
    """The acceptance report of the speculative run (the eval report's keys) with the
    measured figures beside ``ideal_speedup``."""
    report = dict(speculative["acceptance_report"])
    k = int(report["num_speculative_tokens"])
    comparison = [compare_level(b, s, k) for b, s in zip(baseline["levels"], speculative["levels"])]
    report.update(extra)
    if "categories" in speculative:
        report["categories"] = speculative["categories"]
    report["measured_speedup"] = comparison[0]["measured_speedup"]
    report["speedup"] = {
        "version": SPEEDUP_VERSION,
        "num_prompts": num_prompts,
        "max_new_tokens": load.max_tokens,
        "ignore_eos": load.ignore_eos,
        "temperature": 0.0,
        "concurrencies": list(load.concurrencies),
        "baseline": {k2: v for k2, v in baseline.items()},
        "speculative": {k2: v for k2, v in speculative.items() if k2 not in ("acceptance_report", "categories")},
        "comparison": comparison,
    }
    return report


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_speedup(report: dict[str, Any]) -> str:
    """The table: per concurrency, both servers' figures, the ratio and the acceptance."""
    s = report["speedup"]
    header = ("conc", "base tok/s", "spec tok/s", "speedup", "ideal", "base TPOT ms", "spec TPOT ms",
              "base TTFT ms", "spec TTFT ms", "accept len")
    rows = []
    for b, sp, cmp in zip(s["baseline"]["levels"], s["speculative"]["levels"], s["comparison"]):
        rows.append((str(b["concurrency"]), _fmt(b["output_tokens_per_s"]), _fmt(sp["output_tokens_per_s"]),
                     _fmt(cmp["measured_speedup"], ".3f") + "x", _fmt(cmp["ideal_speedup"], ".3f") + "x",
                     _fmt(b["tpot_ms"]["mean"]), _fmt(sp["tpot_ms"]["mean"]), _fmt(b["ttft_ms"]["mean"]),
                     _fmt(sp["ttft_ms"]["mean"]), _fmt(sp["acceptance"]["mean_acceptance_length"], ".3f")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"measured speedup ({s['num_prompts']} prompts x {s['max_new_tokens']} tokens, greedy, "
             f"K={report['num_speculative_tokens']}; baseline {s['baseline']['endpoint']}, "
             f"speculative {s['speculative']['endpoint']}):",
             "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for cmp in s["comparison"]:
        bd = cmp.get("breakdown")
        if bd:
            lines.append(
                f"concurrency {cmp['concurrency']}: verifier step {bd['verifier_step_ms']:.1f} ms (1 token); "
                f"speculative step {bd['speculative_step_ms']:.1f} ms ({bd['tokens_per_speculative_step']:.2f} "
                f"tokens) = verifier step + {bd['draft_and_verify_overhead_ms']:.1f} ms of drafting and "
                f"verifying ({bd['overhead_in_verifier_steps']:.2f} verifier steps); implied draft cost "
                f"{_fmt(cmp.get('implied_draft_cost'), '.3f')}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ServerPair:
    baseline: VllmCommand
    speculative: VllmCommand
    verifier: str
    num_speculative_tokens: int


def plan_pair(checkpoint: Path, info: dict[str, Any], vllm_version: str, vllm_args: Sequence[str],
              api_key: str | None = None, vllm_bin: str | None = None, kv_cache_gib: int | None = None,
              port: int | None = None) -> ServerPair:
    """The two commands: the verifier alone, and `speculators serve`'s form of the speculator,
    with the same vLLM flags (and port, unless ``--port`` is among them; they run one at a time)."""
    from speculators.vllm.launch import check_passthrough
    from speculators.vllm.readiness import free_port
    from speculators.vllm.serve import serve_plan

    plan = serve_plan(checkpoint, info, vllm_version)
    if plan.explicit:
        check_passthrough(vllm_args)
    args = list(vllm_args)
    if flag_value(args, ["--port"]) is None:
        args += ["--port", str(port or free_port())]
    paths = [str(checkpoint), info["verifier"]]
    baseline = build_vllm_command(info["verifier"], args, vllm_bin, api_key, kv_cache_gib=kv_cache_gib,
                                  model_paths=paths)
    spec = build_vllm_command(plan.model, [*plan.args, *args], vllm_bin, api_key, kv_cache_gib=kv_cache_gib,
                              model_paths=paths)
    return ServerPair(baseline, spec, info["verifier"], int(info["num_speculative_tokens"]))


def run_pair(pair: ServerPair, prompts: Sequence[list[int]], load: LoadSettings, api_key: str | None = None,
             ready_timeout_s: float = 1800.0, log_dir: Path | None = None,
             categories: list[str] | None = None, say=print) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the baseline, measure, stop it; then the same for the speculative server."""
    import shlex

    from speculators.vllm.readiness import ManagedServer

    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="speculators-speedup-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, cmd, speculative in (("baseline", pair.baseline, False), ("speculative", pair.speculative, True)):
        log = log_dir / f"{name}.log"
        say(f"{name} server: {' '.join(shlex.quote(c) for c in cmd.argv)} (log {log})", flush=True)
        with open(log, "w") as fh:
            server = ManagedServer(cmd.argv, cmd.url, ready_timeout_s, env=cmd.env, api_key=api_key, log_file=fh)
            try:
                server.start()
                say(f"{name} server ready at {cmd.url}; measuring", flush=True)
                results.append(measure_server(cmd.url, prompts, load, api_key, speculative,
                                              categories=categories if speculative else None))
            finally:
                server.stop()
    return results[0], results[1]
