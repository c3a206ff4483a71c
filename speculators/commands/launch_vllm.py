"""`speculators launch-vllm MODEL [--target-layer-ids ...] -- <vLLM args>`.

Starts `vllm serve` configured to export the hidden states of the chosen layers
(`extract_hidden_states` + `ExampleHiddenStatesConnector`), for online training
and the vllm datagen backend. Everything after `--` goes to vLLM unchanged.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "launch-vllm",
        help="start a vLLM server that exports verifier hidden states",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="verifier model name or path")
    p.add_argument("--target-layer-ids", type=int, nargs="+", default=None,
                   help="vLLM layer ids to export (default [2, n//2, n-3, n]; n = final layer). "
                        "Pass the same aux ids to datagen/train")
    p.add_argument("--include-last-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="append the final layer (id n) to --target-layer-ids (default on)")
    p.add_argument("--hidden-states-path", default="/tmp/hidden_states",
                   help="directory vLLM writes per-request hidden-state files to; the trainer must see it "
                        "(default /tmp/hidden_states)")
    p.add_argument("--num-hidden-layers", type=int, default=None,
                   help="the verifier's layer count, to skip reading its config")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom config code when reading the layer count (pass it after -- for vLLM too)")
    p.add_argument("--vllm-bin", default=None, help="vLLM executable (default: `vllm` on PATH)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("--wait-ready", action=argparse.BooleanOptionalAction, default=True,
                   help="poll /health and /v1/models and say when the server is ready (default on)")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for readiness")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    from pathlib import Path

    from speculators.vllm.launch import HiddenStatesLaunch, endpoint_from_args, vllm_command_prefix
    from speculators.vllm.layers import num_hidden_layers_of, resolve_layer_ids
    from speculators.vllm.readiness import ManagedServer, exit_on_sigterm

    n = args.num_hidden_layers or num_hidden_layers_of(args.model, args.trust_remote_code)
    layer_ids = resolve_layer_ids(n, args.target_layer_ids, args.include_last_layer)
    hs_path = str(Path(args.hidden_states_path).expanduser().resolve())
    launch = HiddenStatesLaunch(args.model, layer_ids, hs_path, list(args.passthrough))
    prefix = ["vllm"] if args.dry_run else vllm_command_prefix(args.vllm_bin)
    cmd = launch.command(prefix)
    print("command:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    print(f"layer ids: {layer_ids} (aux {layer_ids[:-1]}, final {layer_ids[-1]}); "
          f"hidden states go to {hs_path}", flush=True)
    if args.dry_run:
        return 0
    Path(hs_path).mkdir(parents=True, exist_ok=True)
    exit_on_sigterm()
    url = endpoint_from_args(launch.vllm_args)
    server = ManagedServer(cmd, url, args.ready_timeout)
    try:
        if args.wait_ready:
            server.start()
            print(f"ready: {url} serves {server.model_ids}; train with "
                  f"`speculators train ... --vllm-endpoint {url}`", flush=True)
        else:
            import subprocess

            server.process = subprocess.Popen(cmd, start_new_session=True)
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()
