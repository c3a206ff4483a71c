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
    p.add_argument("--vllm-bin", default=None, help="vLLM executable (default: `vllm` on PATH)")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for readiness")
    p.add_argument("--exit-when-ready", action="store_true",
                   help="stop the server once it is ready (a smoke test that vLLM loads the checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex

    from speculators.vllm.launch import endpoint_from_args, serve_command, served_model_name, vllm_command_prefix
    from speculators.vllm.readiness import ManagedServer, exit_on_sigterm
    from speculators.vllm.serve import chat_instructions, read_speculator_config, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    info = read_speculator_config(ckpt)
    vllm_args = list(args.passthrough)
    prefix = ["vllm"] if args.dry_run else vllm_command_prefix(args.vllm_bin)
    cmd = serve_command(prefix, str(ckpt), vllm_args)
    print("command:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    print(f"speculator {ckpt}: verifier {info['verifier']}, "
          f"{info['num_speculative_tokens']} speculative tokens", flush=True)
    if args.dry_run:
        return 0
    url = endpoint_from_args(vllm_args)
    exit_on_sigterm()
    server = ManagedServer(cmd, url, args.ready_timeout)
    try:
        server.start()
        model_id = served_model_name(str(ckpt), vllm_args)
        if model_id not in server.model_ids:
            model_id = server.model_ids[0]
        print(chat_instructions(url, model_id), flush=True)
        if args.exit_when_ready:
            return 0
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()
