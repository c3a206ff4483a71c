"""The demo's regeneration backend, its vLLM acceptance check and its summary.

The regenerate stage itself comes from the shared stage builder (speculators.config.stages)
through the demo's run settings (`demo.demo_run_settings`); these steps stay the demo's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from speculators.config.device import resolve_device
from speculators.config.stages import StagePaths


def regen_backend(args: argparse.Namespace) -> str:
    if args.regen_backend != "auto":
        return args.regen_backend
    return "vllm" if _vllm_importable() else "transformers"


def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    if resolve_device("auto") == "cpu":  # the KV cache size is `speculators serve`'s own choice (cpu_memory.choose_kv_cache)
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return env


def vllm_eval(args: argparse.Namespace, work: Path, times: dict[str, float]) -> dict[str, Any] | None:
    """Serve the checkpoint (`speculators serve`), send the held-out prompts
    (`speculators eval --vllm-endpoint`), stop the server; the report or None."""
    enabled = args.vllm_eval if args.vllm_eval is not None else _vllm_importable()
    if not enabled:
        print("== vllm-eval: skipped (vLLM is not importable here; --vllm-eval to insist)", flush=True)
        return None
    from speculators import process
    from speculators.cli import main as cli_main
    from speculators.vllm.readiness import free_port, probe

    start = time.time()
    ckpt = work / "checkpoints" / "checkpoint_best"
    model = str(Path(args.model) if args.model else work / "verifier")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "speculators", "serve", str(ckpt), "--", "--host", "127.0.0.1",
             "--port", str(port), "--max-model-len", str(max(1024, args.seq_length * 2)), "--seed", "0",
             "--enforce-eager"]
    print(f"== vllm-eval: {' '.join(serve[2:])} (a CPU server takes 1-3 minutes to start)", flush=True)
    last = [0.0]

    def answers() -> bool:
        if probe(url):
            return True
        if time.time() - last[0] >= 10:
            last[0] = time.time()
            print(f"   waiting for vLLM at {url} ({time.time() - start:.0f}s)", flush=True)
        return False

    with open(work / "vllm_serve.log", "wb") as log:
        server = process.start(serve, log=log, env=_server_env())
        try:
            try:
                server.wait_ready(answers, args.vllm_ready_timeout, poll_s=2)
            except process.ExitedEarly as exc:
                print(f"demo: the vLLM server exited ({exc.returncode}) before it was ready; see "
                      f"{work / 'vllm_serve.log'}", file=sys.stderr)
                return None
            except process.TimedOut:
                print(f"demo: the vLLM server was not ready after {args.vllm_ready_timeout:g}s", file=sys.stderr)
                return None
            argv = ["eval", "--vllm-endpoint", url, "--data", "sharegpt", "--verifier", model,
                    "--skip-samples", str(args.max_samples), "--data-seed", "0", "--seq-length", str(args.seq_length),
                    "--num-prompts", str(args.eval_prompts), "--output-json", str(work / "eval_vllm.json"),
                    "--output-streams", str(work / "streams_vllm.jsonl")]
            print(f"== vllm-eval: speculators {' '.join(argv)}", flush=True)
            rc = cli_main(argv)
            if rc != 0:
                print(f"demo: the vLLM eval failed (exit {rc})", file=sys.stderr)
                return None
        finally:
            server.stop(grace_s=30)
    times["vllm-eval"] = round(time.time() - start, 1)
    print(f"== vllm-eval: done in {times['vllm-eval']:.1f}s", flush=True)
    return json.loads((work / "eval_vllm.json").read_text())


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def stream_agreement(work: Path) -> dict[str, Any] | None:
    """Prompts on which the PyTorch eval and vLLM saw the same prompt ids and generated the
    same ids (None when either side wrote no streams)."""
    from speculators.errors import UserError
    from speculators.evaluate.streams import compare_streams, read_streams

    a, b = work / "streams_pytorch.jsonl", work / "streams_vllm.jsonl"
    if not (a.is_file() and b.is_file()):
        return None
    try:
        return compare_streams(read_streams(a), read_streams(b))
    except UserError as exc:
        return {"error": str(exc)}


def finish(args: argparse.Namespace, work: Path, times: dict[str, float],
           vllm_report: dict[str, Any] | None) -> int:
    """Print both acceptance figures and write WORKDIR/demo_summary.json."""
    model = Path(args.model) if args.model else work / "verifier"
    torch_report = _read(work / "eval.json")
    summary = {
        "verifier": str(model),
        "verifier_card": _read(model / "verifier_card.json"),
        "regenerated": bool(args.regenerate),
        "regeneration": ({"backend": regen_backend(args), "max_tokens": args.regen_max_tokens,
                          "max_turns": args.regen_max_turns, "temperature": 0.0,
                          "output": str(StagePaths(work).regenerated),
                          "summary": _read(StagePaths(work).regenerate_summary)} if args.regenerate else None),
        "num_speculative_tokens": args.ttt_steps,
        "acceptance_length": {
            "pytorch": torch_report and torch_report["mean_acceptance_length"],
            "vllm": vllm_report and vllm_report["mean_acceptance_length"],
        },
        "acceptance_rate_per_position": {
            "pytorch": torch_report and torch_report["acceptance_rate_per_position"],
            "vllm": vllm_report and vllm_report["acceptance_rate_per_position"],
        },
        "token_streams": stream_agreement(work) if vllm_report is not None else None,
        "stage_seconds": times,
        "total_seconds": round(sum(times.values()), 1),
    }
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = summary["acceptance_length"]
    print(f"\nDemo finished in {summary['total_seconds']:.0f}s. Outputs in {work}/ ; best checkpoint: "
          f"{work}/checkpoints/checkpoint_best")
    print(f"trained on {'responses regenerated by the verifier' if args.regenerate else 'original ShareGPT responses'}")
    line = f"mean acceptance length at K={args.ttt_steps} (greedy, held-out prompts): PyTorch {acc['pytorch']:.3f}"
    if acc["vllm"] is not None:
        line += f", vLLM {acc['vllm']:.3f} (difference {abs(acc['vllm'] - acc['pytorch']):.3f})"
    else:
        line += ", vLLM not measured"
    print(line)
    agree = summary["token_streams"]
    if agree and "error" not in agree:
        print(f"token streams: prompt ids equal on {agree['prompt_ids_equal']}/{agree['prompts']} prompts, "
              f"generated ids equal on {agree['tokens_equal']}/{agree['prompts']}"
              + (f" (first difference: prompt {agree['first_difference']['prompt']}, token "
                 f"{agree['first_difference']['position']})" if agree["first_difference"] else ""))
    print(f"summary: {work / 'demo_summary.json'}")
    print(f"serve it with:  speculators serve {work}/checkpoints/checkpoint_best")
    return 0
