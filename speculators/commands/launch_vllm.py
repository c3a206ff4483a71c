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
    p.add_argument("--vllm-bin", default=None,
                   help="vLLM executable (default: vLLM's Python entry module in this environment)")
    p.add_argument("--api-key", default=None,
                   help="require this key from clients (given to vLLM as $VLLM_API_KEY; default $VLLM_API_KEY)")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("--wait-ready", action=argparse.BooleanOptionalAction, default=True,
                   help="poll /health and /v1/models and say when the server is ready (default on)")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for readiness")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    from pathlib import Path

    from speculators.layers import num_hidden_layers_of, resolve_layer_ids
    from speculators.vllm.hs_files import write_server_info
    from speculators.vllm.launch import HiddenStatesLaunch, VllmEntry, api_key_from_env
    from speculators.vllm.readiness import ManagedServer, exit_on_sigterm

    n = args.num_hidden_layers or num_hidden_layers_of(args.model, args.trust_remote_code)
    layer_ids = resolve_layer_ids(args.target_layer_ids, n, include_last_layer=args.include_last_layer,
                                  flag="--target-layer-ids", require_final=args.include_last_layer)
    hs_path = str(Path(args.hidden_states_path).expanduser().resolve())
    launch = HiddenStatesLaunch(args.model, layer_ids, hs_path, list(args.passthrough))
    api_key = api_key_from_env(args.api_key)
    cmd = launch.build(args.vllm_bin, api_key, VllmEntry(["vllm"]) if args.dry_run else None)
    print("command:", " ".join(shlex.quote(c) for c in cmd.argv), flush=True)
    print(f"layer ids: {layer_ids} (aux {layer_ids[:-1]}, final {layer_ids[-1]}); "
          f"hidden states go to {hs_path}", flush=True)
    if args.dry_run:
        return 0
    Path(hs_path).mkdir(parents=True, exist_ok=True)
    write_server_info(hs_path, args.model, layer_ids)  # clients check the ids by value
    exit_on_sigterm()
    server = ManagedServer(cmd.argv, cmd.url, args.ready_timeout, env=cmd.env, api_key=api_key)
    try:
        if args.wait_ready:
            server.start()
            print(f"ready: {cmd.url} serves {server.model_ids}; train with "
                  f"`speculators train ... --vllm-endpoint {cmd.url}`", flush=True)
        else:
            server.spawn()
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()
