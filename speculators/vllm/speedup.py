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

import statistics
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
    repeats: int = 3


def parse_concurrencies(text: str) -> tuple[int, ...]:
    """``"1,4"`` -> ``(1, 4)``; each >= 1."""
    try:
        values = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserError(f"--concurrency {text!r}: comma-separated whole numbers, e.g. 1,4") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--concurrency {text!r}: each must be >= 1")
    return values


BASELINE, SPECULATIVE = "baseline", "speculative"


def interleave_order(repeats: int) -> list[tuple[int, str]]:
    """The passes of one concurrency level when both servers run at once: ``(repeat, server)``
    in order, baseline and speculative alternating as B S S B B S S B ..., so a load that drifts
    linearly over a pair of repeats costs both servers the same."""
    order: list[tuple[int, str]] = []
    for r in range(repeats):
        pair = (BASELINE, SPECULATIVE) if r % 2 == 0 else (SPECULATIVE, BASELINE)
        order += [(r, name) for name in pair]
    return order


def sequential_order(repeats: int, server: str) -> list[tuple[int, str]]:
    """One server alone (the other is not running): its R passes back to back."""
    return [(r, server) for r in range(repeats)]


@dataclass
class _Target:
    """One server being measured: where it is, and its counters at the start."""

    base: str
    headers: dict[str, str]
    model: str
    speculative: bool
    api_key: str | None
    model_name: str | None


def _warm_up(t: _Target, prompts: Sequence[list[int]], load: LoadSettings) -> None:
    if load.warmup_requests:
        run_load(t.base, t.model, list(prompts[: load.warmup_requests]), load.max_tokens, 1, t.headers,
                 load.timeout_s, load.ignore_eos)


def _counts(t: _Target):
    return spec_decode_counts(scrape(t.base, api_key=t.api_key), t.model_name) if t.speculative else None


def _one_pass(t: _Target, prompts: Sequence[list[int]], load: LoadSettings, c: int) -> dict[str, Any]:
    timings = run_load(t.base, t.model, list(prompts), load.max_tokens, c, t.headers, load.timeout_s,
                       load.ignore_eos)
    failed = [x.error for x in timings if x.error]
    if failed:
        raise UserError(f"{len(failed)} of {len(timings)} requests to {t.base} failed at concurrency {c}: "
                        f"{failed[0]}")
    return summarize(timings, c)


def run_levels(targets: dict[str, _Target], prompts: Sequence[list[int]], load: LoadSettings,
               order_of: Any) -> dict[str, list[dict[str, Any]]]:
    """Each concurrency level: the passes ``order_of(repeats)`` lists, on the ``targets`` named
    there; per server and level the combined figures (`combine_runs`), the speculative server's
    with the acceptance its counters gained over that level's passes."""
    levels: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for c in load.concurrencies:
        before = {name: _counts(t) for name, t in targets.items()}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for _, name in order_of(load.repeats):
            runs[name].append(_one_pass(targets[name], prompts, load, c))
        for name, t in targets.items():
            level = combine_runs(runs[name])
            if t.speculative:
                level["acceptance"] = _acceptance(report_from_metrics(scrape(t.base, api_key=t.api_key),
                                                                      t.model_name, since=before[name]))
            levels[name].append(level)
    return levels


def _finish(t: _Target, levels: list[dict[str, Any]], start, prompts: Sequence[list[int]], load: LoadSettings,
            categories: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"endpoint": t.base, "model": t.model, "levels": levels}
    if t.speculative:
        out["acceptance_report"] = report_from_metrics(scrape(t.base, api_key=t.api_key), t.model_name,
                                                       since=start)
        if categories is not None:
            out["categories"] = drive_and_measure(t.base, list(prompts), load.max_tokens, 0.0, t.model_name,
                                                  concurrency=max(load.concurrencies), timeout_s=load.timeout_s,
                                                  api_key=t.api_key, categories=categories)["categories"]
    return out


def measure_server(base: str, prompts: Sequence[list[int]], load: LoadSettings, api_key: str | None = None,
                   speculative: bool = False, model_name: str | None = None,
                   categories: list[str] | None = None) -> dict[str, Any]:
    """One server alone: warm it up, then run every prompt ``load.repeats`` times at each
    concurrency; with ``speculative`` each level gets the acceptance its requests added to the
    counters, and the whole run's report; with ``categories`` too, one more pass, category by
    category, as `eval --vllm-endpoint --data` sends them (stopping at end of sequence), gives
    the acceptance per category."""
    name = SPECULATIVE if speculative else BASELINE
    t = _Target(base, auth_headers(api_key), "", speculative, api_key, model_name)
    t.model = served_model(base, t.headers)
    _warm_up(t, prompts, load)
    start = _counts(t)
    levels = run_levels({name: t}, prompts, load, lambda r: sequential_order(r, name))[name]
    return _finish(t, levels, start, prompts, load, categories)


def measure_interleaved(baseline: str, speculative: str, prompts: Sequence[list[int]], load: LoadSettings,
                        api_key: str | None = None, model_name: str | None = None,
                        categories: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both servers running at once: warm both up, then at each concurrency alternate their
    passes (`interleave_order`), so the machine's load drift hits both alike."""
    headers = auth_headers(api_key)
    targets = {BASELINE: _Target(baseline, headers, served_model(baseline, headers), False, api_key, None),
               SPECULATIVE: _Target(speculative, headers, served_model(speculative, headers), True, api_key,
                                    model_name)}
    for t in targets.values():
        _warm_up(t, prompts, load)
    start = _counts(targets[SPECULATIVE])
    levels = run_levels(targets, prompts, load, interleave_order)
    return (_finish(targets[BASELINE], levels[BASELINE], None, prompts, load, None),
            _finish(targets[SPECULATIVE], levels[SPECULATIVE], start, prompts, load, categories))


def spread_of(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and spread = (max - min) / median of repeated measurements."""
    vals = [float(v) for v in values]
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals), "values": vals,
            "spread": (max(vals) - min(vals)) / med if med else None}


def combine_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """R passes of one level (`loadgen.summarize`'s dicts) as one: the median output tokens/s
    and the median of each pass's TTFT/TPOT mean (the ``mean`` key, as a single pass reports it),
    with every pass's value and the spread; ``runs`` keeps the passes themselves."""
    first = runs[0]
    tps = spread_of([r["output_tokens_per_s"] for r in runs])
    out: dict[str, Any] = {
        "concurrency": first["concurrency"],
        "repeats": len(runs),
        "requests": first["requests"],
        "errors": sum(r["errors"] for r in runs),
        "output_tokens": first["output_tokens"],
        "output_tokens_per_s": tps["median"],
        "output_tokens_per_s_runs": tps["values"],
        "output_tokens_per_s_spread": tps["spread"],
    }
    for key in ("ttft_ms", "tpot_ms"):
        means = [r[key]["mean"] for r in runs if r[key]["mean"] is not None]
        stat = spread_of(means) if means else None
        out[key] = {"mean": stat["median"] if stat else None, "mean_runs": means,
                    "spread": stat["spread"] if stat else None}
    out["runs"] = list(runs)
    return out


def ratio_of_runs(spec: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """Repeat i's speculative over baseline output tokens/s (paired: in the interleaved order
    they ran next to each other); their median, min and max."""
    if len(spec) != len(base):
        raise ValueError(f"{len(spec)} speculative passes against {len(base)} baseline passes")
    ratios = [s / b for s, b in zip(spec, base) if b]
    return spread_of(ratios) if ratios else {"median": None, "min": None, "max": None, "values": [],
                                              "spread": None}


def _acceptance(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "mean_acceptance_length",
            "acceptance_rate_per_position", "draft_acceptance_rate")
    return {k: report[k] for k in keys}


def compare_level(base: dict[str, Any], spec: dict[str, Any], k: int) -> dict[str, Any]:
    """Ratios and the step breakdown of one concurrency (see the module docstring)."""
    tau = spec["acceptance"]["mean_acceptance_length"]
    if "output_tokens_per_s_runs" in base and "output_tokens_per_s_runs" in spec:
        ratios = ratio_of_runs(spec["output_tokens_per_s_runs"], base["output_tokens_per_s_runs"])
    else:  # one pass each
        ratios = ratio_of_runs([spec["output_tokens_per_s"]], [base["output_tokens_per_s"]])
    ratio = ratios["median"]
    b_tpot, s_tpot = base["tpot_ms"]["mean"], spec["tpot_ms"]["mean"]
    b_ttft, s_ttft = base["ttft_ms"]["mean"], spec["ttft_ms"]["mean"]
    out: dict[str, Any] = {
        "concurrency": base["concurrency"],
        "measured_speedup": ratio,
        "measured_speedup_runs": ratios["values"],
        "measured_speedup_range": [ratios["min"], ratios["max"]],
        "measured_speedup_spread": ratios["spread"],
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
                         num_prompts: int, interleaved: bool = False, **extra: Any) -> dict[str, Any]:
    """The acceptance report of the speculative run (the eval report's keys) with the
    measured figures beside ``ideal_speedup`` (``measured_speedup``: the median over the
    repeats of the first concurrency's speculative / baseline ratio)."""
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
        "repeats": load.repeats,
        "interleaved": interleaved,
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


def _spread_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def format_ratio(cmp: dict[str, Any]) -> str:
    """``1.42x (1.31-1.50)``: the median ratio and the repeats' range (just ``1.42x`` for one)."""
    text = _fmt(cmp["measured_speedup"], ".2f") + "x"
    lo, hi = cmp.get("measured_speedup_range") or (None, None)
    if lo is not None and len(cmp.get("measured_speedup_runs") or []) > 1:
        text += f" ({lo:.2f}-{hi:.2f})"
    return text


def format_speedup(report: dict[str, Any]) -> str:
    """The table: per concurrency, both servers' median figures with the spread of their
    repeats, the ratio (median and range) and the acceptance."""
    s = report["speedup"]
    header = ("conc", "base tok/s (spread)", "spec tok/s (spread)", "speedup (min-max)", "ideal",
              "base TPOT ms", "spec TPOT ms", "base TTFT ms", "spec TTFT ms", "accept len")
    rows = []
    for b, sp, cmp in zip(s["baseline"]["levels"], s["speculative"]["levels"], s["comparison"]):
        rows.append((str(b["concurrency"]),
                     f"{_fmt(b['output_tokens_per_s'])} ({_spread_pct(b.get('output_tokens_per_s_spread'))})",
                     f"{_fmt(sp['output_tokens_per_s'])} ({_spread_pct(sp.get('output_tokens_per_s_spread'))})",
                     format_ratio(cmp), _fmt(cmp["ideal_speedup"], ".3f") + "x",
                     _fmt(b["tpot_ms"]["mean"]), _fmt(sp["tpot_ms"]["mean"]), _fmt(b["ttft_ms"]["mean"]),
                     _fmt(sp["ttft_ms"]["mean"]), _fmt(sp["acceptance"]["mean_acceptance_length"], ".3f")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    repeats = s.get("repeats", 1)
    how = ("both servers up, passes interleaved B S S B" if s.get("interleaved") else
           "one server at a time")
    lines = [f"measured speedup ({s['num_prompts']} prompts x {s['max_new_tokens']} tokens, greedy, "
             f"K={report['num_speculative_tokens']}; {repeats} repeat(s) per level, {how}; medians, spread = "
             f"(max - min) / median; baseline {s['baseline']['endpoint']}, "
             f"speculative {s['speculative']['endpoint']}):",
             "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    for b, sp, cmp in zip(s["baseline"]["levels"], s["speculative"]["levels"], s["comparison"]):
        if len(cmp.get("measured_speedup_runs") or []) > 1:
            lines.append(f"concurrency {cmp['concurrency']} per repeat: baseline tok/s "
                         f"{', '.join(_fmt(v) for v in b['output_tokens_per_s_runs'])}; speculative "
                         f"{', '.join(_fmt(v) for v in sp['output_tokens_per_s_runs'])}; ratio "
                         f"{', '.join(_fmt(v, '.2f') for v in cmp['measured_speedup_runs'])}")
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
              port: int | None = None, concurrent: bool = False) -> ServerPair:
    """The two commands: the verifier alone, and `speculators serve`'s form of the speculator,
    with the same vLLM flags. One after the other they share a port (``--port`` among the flags,
    else ``port`` or a free one); both at once (``concurrent``) each gets its own free port, and
    a ``--port`` among the flags is refused."""
    from speculators.vllm.launch import check_passthrough
    from speculators.vllm.readiness import free_port
    from speculators.vllm.serve import serve_plan

    plan = serve_plan(checkpoint, info, vllm_version)
    if plan.explicit:
        check_passthrough(vllm_args)
    args = list(vllm_args)
    if concurrent:
        if flag_value(args, ["--port"]) is not None:
            raise UserError("--concurrent-servers starts two servers, each on its own free port: drop --port "
                            "from the vLLM flags (or use --no-concurrent-servers)")
        base_port = port or free_port()
        spec_port = free_port()
        while spec_port == base_port:
            spec_port = free_port()
        base_args, spec_args = [*args, "--port", str(base_port)], [*args, "--port", str(spec_port)]
    else:
        if flag_value(args, ["--port"]) is None:
            args += ["--port", str(port or free_port())]
        base_args = spec_args = args
    paths = [str(checkpoint), info["verifier"]]
    baseline = build_vllm_command(info["verifier"], base_args, vllm_bin, api_key, kv_cache_gib=kv_cache_gib,
                                  model_paths=paths)
    spec = build_vllm_command(plan.model, [*plan.args, *spec_args], vllm_bin, api_key, kv_cache_gib=kv_cache_gib,
                              model_paths=paths)
    return ServerPair(baseline, spec, info["verifier"], int(info["num_speculative_tokens"]))


def run_pair(pair: ServerPair, prompts: Sequence[list[int]], load: LoadSettings, api_key: str | None = None,
             ready_timeout_s: float = 1800.0, log_dir: Path | None = None,
             categories: list[str] | None = None, say=print,
             concurrent: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """One after the other: start the baseline, measure (R passes per level), stop it; then the
    same for the speculative server. ``concurrent``: start both, then measure with their passes
    interleaved (`measure_interleaved`), then stop both."""
    import contextlib
    import shlex

    from speculators.vllm.readiness import ManagedServer

    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="speculators-speedup-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = ((BASELINE, pair.baseline, False), (SPECULATIVE, pair.speculative, True))

    def started(stack: contextlib.ExitStack, name: str, cmd: VllmCommand) -> None:
        log = log_dir / f"{name}.log"
        say(f"{name} server: {' '.join(shlex.quote(c) for c in cmd.argv)} (log {log})", flush=True)
        fh = stack.enter_context(open(log, "w"))
        server = ManagedServer(cmd.argv, cmd.url, ready_timeout_s, env=cmd.env, api_key=api_key, log_file=fh)
        stack.callback(server.stop)
        server.start()
        say(f"{name} server ready at {cmd.url}", flush=True)

    if concurrent:
        with contextlib.ExitStack() as stack:
            for name, cmd, _ in servers:
                started(stack, name, cmd)
            say(f"measuring both, passes interleaved, {load.repeats} repeat(s) per level", flush=True)
            return measure_interleaved(pair.baseline.url, pair.speculative.url, prompts, load, api_key,
                                       categories=categories)
    results = []
    for name, cmd, speculative in servers:
        with contextlib.ExitStack() as stack:
            started(stack, name, cmd)
            say(f"measuring {name}, {load.repeats} repeat(s) per level", flush=True)
            results.append(measure_server(cmd.url, prompts, load, api_key, speculative,
                                          categories=categories if speculative else None))
    return results[0], results[1]
