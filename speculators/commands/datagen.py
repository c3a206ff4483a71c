"""`speculators datagen`: run the verifier offline and save its hidden states."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "datagen",
        help="generate verifier hidden states for a prepared dataset (resumable)",
        description=(
            "Runs the verifier over the prepared dataset and writes DIR/data_<i>.pt (or safetensors "
            "shards) plus DIR/data_config.json. Rerunning skips finished samples. Layer id i < n is "
            "the residual stream entering decoder layer i; id n is the final layer before the norm. "
            "Arguments after a bare -- go to the backend (vLLM engine args)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--target-model-path", required=True, help="verifier model dir or HF id")
    p.add_argument("--train-data-path", required=True, help="output directory of prepare-data")
    p.add_argument("--output-dir", required=True, help="where hidden states are written")
    p.add_argument(
        "--layer-ids", type=int, nargs="+", default=None,
        help="verifier layer ids to save (default: 2, n//2, n-3 and the final layer n)",
    )
    p.add_argument(
        "--include-last-layer", action=argparse.BooleanOptionalAction, default=True,
        help="append the final layer n to --layer-ids when it is missing",
    )
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N prepared samples")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--format", choices=["pt", "safetensors"], default="pt",
                   help="pt: one file per sample (format v1); safetensors: sharded, faster to load")
    p.add_argument("--device", default="auto", help="transformers backend: cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: bf16 on GPU, fp32 on CPU); stored states are bf16")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend only")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm backend only")
    p.add_argument("--max-model-len", type=int, default=None, help="vllm backend only")
    p.set_defaults(func=run)


def run(args) -> int:
    from speculators.datagen.runner import DatagenConfig, run_datagen

    result = run_datagen(
        DatagenConfig(
            target_model_path=args.target_model_path,
            train_data_path=args.train_data_path,
            output_dir=args.output_dir,
            layer_ids=args.layer_ids,
            include_last_layer=args.include_last_layer,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            backend=args.backend,
            format=args.format,
            device=args.device,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            extra_args=list(getattr(args, "passthrough", []) or []),
        )
    )
    print(
        f"datagen: {result.total} samples ({result.generated} generated, {result.skipped_existing} "
        f"already done) -> {result.output_dir} [{result.seconds:.1f}s, {result.tokens_per_s:.0f} tok/s]"
    )
    return 0
