"""`speculators serve CHECKPOINT [-- vLLM args]`: run `vllm serve` on a trained speculator.

The speculator directory names its verifier in config.json, so vLLM loads both.
Readiness is checked on /health and /v1/models; then the command prints how to
chat with the server and keeps it running until interrupted.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a speculator (and its verifier) with vLLM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="speculator directory (or a train --save-path: uses checkpoint_best)")
    p.add_argument("--vllm-bin", default=None,
                   help="vLLM executable (default: vLLM's Python entry module in this environment)")
    p.add_argument("--api-key", default=None,
                   help="require this key from clients (given to vLLM as $VLLM_API_KEY; default $VLLM_API_KEY)")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for readiness")
    p.add_argument("--kv-cache-gib", type=int, default=None, metavar="GIB",
                   help="CPU only: GiB of memory for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE); default "
                        "$VLLM_CPU_KVCACHE_SPACE if set, else a quarter of the free memory left after "
                        "the weights and 2 GiB, within 1-32")
    p.add_argument("--exit-when-ready", action="store_true",
                   help="stop the server once it is ready (a smoke test that vLLM loads the checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("--vllm-version", default=None,
                   help="with --dry-run: plan for this vLLM version instead of the installed one")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex

    from speculators.errors import UserError
    from speculators.vllm.launch import (
        VllmEntry,
        api_key_from_env,
        build_vllm_command,
        check_passthrough,
        installed_vllm_version,
        served_model_name,
    )
    from speculators.vllm.readiness import ManagedServer, exit_on_sigterm
    from speculators.vllm.serve import chat_instructions, read_speculator_config, resolve_checkpoint, serve_plan

    ckpt = resolve_checkpoint(args.checkpoint)
    info = read_speculator_config(ckpt)
    version = args.vllm_version if args.dry_run and args.vllm_version else installed_vllm_version()
    if version is None:
        raise UserError("vLLM is not installed here: run `make vllm` (python scripts/install_vllm.py)")
    plan = serve_plan(ckpt, info, version)
    if plan.explicit:
        check_passthrough(args.passthrough)
    api_key = api_key_from_env(args.api_key)
    entry = VllmEntry(["vllm"]) if args.dry_run else None
    cmd = build_vllm_command(plan.model, [*plan.args, *args.passthrough], args.vllm_bin, api_key, entry,
                             kv_cache_gib=args.kv_cache_gib, model_paths=[str(ckpt), info["verifier"]])
    print("command:", " ".join(shlex.quote(c) for c in cmd.argv), flush=True)
    if cmd.kv_cache:
        print(f"KV cache: {cmd.kv_cache}", flush=True)
    print(f"speculator {ckpt}: verifier {info['verifier']}, "
          f"{info['num_speculative_tokens']} speculative tokens (vLLM {version}"
          f"{', verifier served explicitly' if plan.explicit else ''})", flush=True)
    if args.dry_run:
        return 0
    exit_on_sigterm()
    server = ManagedServer(cmd.argv, cmd.url, args.ready_timeout, env=cmd.env, api_key=api_key)
    try:
        server.start()
        model_id = served_model_name(plan.model, args.passthrough)
        if model_id not in server.model_ids:
            model_id = server.model_ids[0]
        print(chat_instructions(cmd.url, model_id), flush=True)
        if args.exit_when_ready:
            return 0
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()
