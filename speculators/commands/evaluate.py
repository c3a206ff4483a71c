"""`speculators eval`: how many tokens a speculator saves.

PyTorch mode (`--checkpoint`): speculative decoding of held-out prompts with the
draft and the verifier (greedy, or sampling at --temperature > 0 with the standard
rejection rule, so the text is exactly the verifier's). vLLM mode
(`--vllm-endpoint`): the spec-decode counters of a live server's /metrics.
Both report mean acceptance length, per-position acceptance rate and ideal speedup,
printed and written as JSON (--output-json) for the dashboard; with a prompt set (--data
PROMPTS.jsonl, lines {"prompt": ..., "category": ...}) also per category.

--measure-speedup: the measured speedup of the real engine beside the ideal one. The
verifier alone and then the speculator (--checkpoint) are served by vLLM one after the other
(or two running servers are given: --baseline-endpoint and --vllm-endpoint), the same prompts
are streamed to each at every --concurrency (greedy, --max-new-tokens each, end of sequence
ignored), and output tokens/s, time per output token and time to first token of both, their
ratio and the speculative server's acceptance are reported as a table and JSON. vLLM flags go
after `--`, for both servers.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure acceptance length (PyTorch speculative decoding or a live vLLM server)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="speculator directory (or a train --save-path)")
    p.add_argument("--verifier", default=None, help="verifier model (default: the one in the checkpoint's config)")
    p.add_argument("--data", help="held-out prompts: a prepared dataset (prepare-data --output) or a "
                                  "conversation source as prepare-data takes it (sharegpt, PATH.jsonl, HF id); "
                                  "a prompt ends where the first assistant turn starts")
    p.add_argument("--skip-samples", type=int, default=0,
                   help="skip the first N usable conversations/rows (prepare-data --max-samples N used them "
                        "for training)")
    p.add_argument("--data-format-version", type=int, choices=[0, 1], default=1,
                   help="when --data is a hidden-state directory (datagen output): the layout of its data_<i>.pt "
                        "files, 1 = what datagen writes, 0 = the older hidden_state/target layout")
    p.add_argument("--data-seed", type=int, default=0, help="prepare-data's --seed, for a conversation source")
    p.add_argument("--seq-length", type=int, default=None,
                   help="prepare-data's --seq-length, for a conversation source (same kept/dropped decisions)")
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=None,
                   help="tokens drafted per step (default: the checkpoint's speculative_tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (rejection rule)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="use at most this many prompts (default: all; with --measure-speedup: 16)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="use only the validation rows of split_indices(n, FRACTION, --split-seed), "
                        "i.e. the rows `speculators train` held out")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-prompt-len", type=int, default=None, help="keep the last N prompt tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available, bf16), cpu or cuda[:N]")
    p.add_argument("--draft-cost", type=float, default=None,
                   help="draft forward cost relative to the verifier's, for a discounted speedup")
    p.add_argument("--vllm-endpoint", default=None,
                   help="read a live vLLM server's /metrics instead; with --data, first send the held-out "
                        "prompts and report the counters they added")
    p.add_argument("--model-name", default=None,
                   help="with --vllm-endpoint: only counters with this model_name label (vLLM labels them "
                        "with the verifier's path or id); default: all")
    p.add_argument("--api-key", default=None,
                   help="with --vllm-endpoint: the server's --api-key (default $VLLM_API_KEY)")
    p.add_argument("--measure-speedup", action="store_true",
                   help="serve the verifier alone and with the speculator (--checkpoint; vLLM flags after `--`), "
                        "or use --baseline-endpoint and --vllm-endpoint, and measure both on --data's prompts")
    p.add_argument("--concurrency", default="1,4",
                   help="with --measure-speedup: requests in flight, comma-separated levels (e.g. 1,4)")
    p.add_argument("--repeats", type=int, default=3, metavar="R",
                   help="with --measure-speedup: measure each concurrency level R times per server; the report "
                        "gives the medians, every repeat's value and the spread, and the speedup as the median "
                        "of the per-repeat ratios with their min-max")
    p.add_argument("--concurrent-servers", action=argparse.BooleanOptionalAction, default=None,
                   help="with --measure-speedup --checkpoint: run the baseline and speculative servers at once "
                        "(each on its own port) and interleave their passes (B S S B ...), so load drift on the "
                        "machine hits both alike. Default: on when there is no CUDA GPU (CPU serving); off on a "
                        "GPU, where two servers would compete for one GPU's memory (then the servers run one "
                        "after the other, each repeating its passes). Two --*-endpoint servers are always "
                        "interleaved")
    p.add_argument("--baseline-endpoint", default=None,
                   help="with --measure-speedup and --vllm-endpoint: a running server of the verifier alone")
    p.add_argument("--ready-timeout", type=float, default=1800.0,
                   help="with --measure-speedup: seconds to wait for each server it starts")
    p.add_argument("--kv-cache-gib", type=int, default=None, metavar="GIB",
                   help="with --measure-speedup, CPU only: GiB of KV cache for each server it starts "
                        "(as `speculators serve --kv-cache-gib`)")
    p.add_argument("--server-log-dir", default=None,
                   help="with --measure-speedup: where the servers' logs go (default: a new temporary folder)")
    p.add_argument("--output-json", default=None, help="write the report here (JSON)")
    p.add_argument("--output-streams", default=None,
                   help="write each prompt's ids and generated ids here (JSON lines; the PyTorch eval adds the "
                        "tokens accepted per step), to compare two evals of the same prompts token by token")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from speculators.errors import UserError
    from speculators.evaluate.report import format_report, write_report
    from speculators.vllm.launch import api_key_from_env

    streams: list | None = [] if args.output_streams else None
    if args.output_streams and not args.data:
        raise UserError("--output-streams needs --data (the prompts to generate from)")
    if args.measure_speedup:
        from speculators.commands.eval_speedup import run_speedup

        report = run_speedup(args, _heldout(args))
        from speculators.vllm.speedup import format_speedup

        print(format_report(report), flush=True)
        print(format_speedup(report), flush=True)
        if args.output_json:
            write_report(args.output_json, report)
            print(f"report written to {args.output_json}")
        return 0
    if args.baseline_endpoint:
        raise UserError("--baseline-endpoint applies with --measure-speedup")
    if args.vllm_endpoint and args.data:
        from speculators.evaluate.runner import load_prompt_set_of
        from speculators.vllm.metrics import drive_and_measure

        if not args.verifier and not Path(args.data).is_dir():
            raise UserError("--vllm-endpoint with a conversation --data needs --verifier (its tokenizer)")
        prompt_set = load_prompt_set_of(args.data, args.verifier or "", args.num_prompts, _heldout(args),
                                        args.max_prompt_len, args.skip_samples, args.data_seed, args.seq_length,
                                        args.data_format_version)
        report = drive_and_measure(args.vllm_endpoint, prompt_set.prompts, args.max_new_tokens, args.temperature,
                                   args.model_name, api_key=api_key_from_env(args.api_key), streams=streams,
                                   categories=prompt_set.categories)
    elif args.vllm_endpoint:
        from speculators.vllm.metrics import report_from_metrics, scrape

        report = report_from_metrics(scrape(args.vllm_endpoint, api_key=api_key_from_env(args.api_key)),
                                     args.model_name,
                                     endpoint=args.vllm_endpoint)
    else:
        if not args.checkpoint or not args.data:
            raise UserError("eval needs --checkpoint DIR and --data DIR (or --vllm-endpoint URL)")
        from speculators.evaluate.runner import EvalSettings, evaluate_checkpoint
        from speculators.vllm.serve import read_speculator_config, resolve_checkpoint

        k = args.num_speculative_tokens
        if k is None:
            k = read_speculator_config(resolve_checkpoint(args.checkpoint))["num_speculative_tokens"]
        if k < 1:
            raise UserError("--num-speculative-tokens must be >= 1")
        if args.temperature < 0:
            raise UserError("--temperature must be >= 0")
        indices = _heldout(args)
        settings = EvalSettings(k, args.max_new_tokens, args.temperature, args.seed, args.draft_cost, args.device)
        report = evaluate_checkpoint(args.checkpoint, args.verifier, args.data, settings,
                                     args.num_prompts, indices, args.max_prompt_len,
                                     args.skip_samples, args.data_seed, args.seq_length, streams,
                                     args.data_format_version)
    print(format_report(report), flush=True)
    if args.output_streams:
        from speculators.evaluate.streams import write_streams

        write_streams(args.output_streams, streams)
        print(f"token streams written to {args.output_streams}")
    if args.output_json:
        write_report(args.output_json, report)
        print(f"report written to {args.output_json}")
    return 0


def _heldout(args):
    """Row indices of the validation split when --val-fraction is given, else all rows."""
    if not args.val_fraction:
        return None
    from pathlib import Path

    from speculators.errors import UserError

    if not Path(args.data).is_dir():
        raise UserError("--val-fraction applies to a prepared dataset --data directory")
    from datasets import load_from_disk

    from speculators.data.dataset import split_indices
    from speculators.evaluate.runner import is_hidden_state_dir

    if is_hidden_state_dir(args.data):  # the trainer splits the sample store's positions
        from speculators.data.formats import open_sample_store

        n = len(open_sample_store(args.data, data_format_version=args.data_format_version))
    else:
        n = len(load_from_disk(args.data))
    return split_indices(n, args.val_fraction, args.split_seed)[1]
