"""`speculators eval --measure-speedup`: the baseline and speculative servers, the prompts, the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


DEFAULT_PROMPTS = 16  # without --num-prompts: a conversation source would otherwise send thousands


def run_speedup(args, indices=None) -> dict[str, Any]:
    """``indices``: the rows `--val-fraction` keeps (None: all)."""
    from speculators.errors import UserError
    from speculators.evaluate.runner import load_prompt_set_of
    from speculators.vllm.launch import api_key_from_env, has_cuda, installed_vllm_version
    from speculators.vllm.readiness import sigterm_as_exit
    from speculators.vllm.serve import read_speculator_config, resolve_checkpoint
    from speculators.vllm.speedup import (
        LoadSettings,
        build_speedup_report,
        measure_interleaved,
        parse_concurrencies,
        plan_pair,
        run_pair,
    )

    if not args.data:
        raise UserError("--measure-speedup needs --data (the prompts both servers get)")
    if args.temperature != 0:
        raise UserError("--measure-speedup decodes greedily; leave --temperature at 0")
    if args.output_streams:
        raise UserError("--output-streams does not apply with --measure-speedup (use --vllm-endpoint --data)")
    repeats = getattr(args, "repeats", 3)
    if repeats is None or repeats < 1:
        raise UserError(f"--repeats {repeats}: must be >= 1")
    load = LoadSettings(parse_concurrencies(args.concurrency), args.max_new_tokens, repeats=repeats)
    num_prompts = args.num_prompts if args.num_prompts is not None else DEFAULT_PROMPTS
    api_key = api_key_from_env(args.api_key)
    given = [bool(args.vllm_endpoint), bool(args.baseline_endpoint)]
    if any(given) and not all(given):
        raise UserError("--measure-speedup with running servers needs both --baseline-endpoint (the verifier "
                        "alone) and --vllm-endpoint (the speculator); or neither, with --checkpoint")
    if all(given):
        if args.passthrough:
            raise UserError("vLLM flags after `--` apply only to servers --measure-speedup starts")
        tokenizer = args.verifier
        if not tokenizer and not Path(args.data).is_dir():
            raise UserError("--measure-speedup with endpoints and a conversation --data needs --verifier "
                            "(its tokenizer)")
        prompt_set = load_prompt_set_of(args.data, tokenizer or "", num_prompts, indices, args.max_prompt_len,
                                        args.skip_samples, args.data_seed, args.seq_length,
                                        args.data_format_version)
        if getattr(args, "concurrent_servers", None) is False:
            raise UserError("--no-concurrent-servers applies to servers --measure-speedup starts; two running "
                            "--*-endpoint servers are always measured interleaved")
        baseline, speculative = measure_interleaved(args.baseline_endpoint.rstrip("/"),
                                                    args.vllm_endpoint.rstrip("/"), prompt_set.prompts, load,
                                                    api_key, model_name=args.model_name,
                                                    categories=prompt_set.categories)
        return build_speedup_report(baseline, speculative, load, len(prompt_set.prompts), interleaved=True,
                                    data=str(args.data))
    if not args.checkpoint:
        raise UserError("--measure-speedup needs --checkpoint DIR (or --baseline-endpoint and --vllm-endpoint)")
    ckpt = resolve_checkpoint(args.checkpoint)
    info = read_speculator_config(ckpt)
    if args.verifier:
        info = {**info, "verifier": args.verifier}
    version = installed_vllm_version()
    if version is None:
        raise UserError("vLLM is not installed here: run `make vllm` (python scripts/install_vllm.py)")
    concurrent = getattr(args, "concurrent_servers", None)
    if concurrent is None:
        concurrent = not has_cuda()  # two servers on one GPU would compete for its memory
    pair = plan_pair(ckpt, info, version, args.passthrough, api_key, kv_cache_gib=args.kv_cache_gib,
                     concurrent=concurrent)
    prompt_set = load_prompt_set_of(args.data, pair.verifier, num_prompts, indices, args.max_prompt_len,
                                    args.skip_samples, args.data_seed, args.seq_length, args.data_format_version)
    with sigterm_as_exit():
        baseline, speculative = run_pair(pair, prompt_set.prompts, load, api_key, args.ready_timeout,
                                         Path(args.server_log_dir) if args.server_log_dir else None,
                                         prompt_set.categories, concurrent=concurrent)
    return build_speedup_report(baseline, speculative, load, len(prompt_set.prompts), interleaved=concurrent,
                                checkpoint=str(ckpt),
                                verifier=pair.verifier, data=str(args.data), vllm_version=version)
