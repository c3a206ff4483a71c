"""Flags of `speculators train` (also `python -m speculators.train` and under torchrun).

Flag names follow the public speculators training script; the online-mode flags are
read by the online data source (speculators.online.store.build_online_store).
"""

from __future__ import annotations

import argparse

from speculators.train.config import TrainConfig


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--verifier-name-or-path", required=True, help="verifier (target) model directory or HF id")
    g.add_argument("--num-layers", type=int, default=1, help="draft decoder layers (default 1)")
    g.add_argument("--draft-vocab-size", type=int, default=None, help="draft vocabulary size; must match d2t/t2d")
    g.add_argument("--d2t-path", default=None, help="d2t.npy (default: <data-path>/d2t.npy if present)")
    g.add_argument("--t2d-path", default=None, help="t2d.npy (default: <data-path>/t2d.npy if present)")
    g.add_argument("--from-pretrained", default=None, help="initialise the draft from this checkpoint directory")
    g.add_argument("--norm-before-residual", action=argparse.BooleanOptionalAction, default=True,
                   help="layer 0 keeps the normed hidden state as its residual (default on)")
    g.add_argument("--draft-arch", choices=["llama", "qwen3"], default="llama",
                   help="draft decoder layer style: llama, or qwen3 (per-head q/k RMSNorm); default llama")
    g.add_argument("--norm-before-fc", action=argparse.BooleanOptionalAction, default=False,
                   help="EAGLE-3.1: one RMSNorm over the concatenated aux hidden states before fc (default off)")
    g.add_argument("--fc-norm", action=argparse.BooleanOptionalAction, default=False,
                   help="EAGLE-3.1: one RMSNorm per aux hidden state before fc; excludes --norm-before-fc")
    g.add_argument("--norm-output", action=argparse.BooleanOptionalAction, default=False,
                   help="EAGLE-3.1: feed the post-norm hidden state to the next TTT/drafting step (default off)")
    g.add_argument("--sliding-window", type=int, default=None,
                   help="sliding-window attention of this many tokens in every draft layer "
                   "(default: full attention)")
    g.add_argument("--full-attention-indices", type=int, nargs="+", default=None,
                   help="with --sliding-window: draft layers that keep full attention (such a draft "
                   "cannot be served by vLLM, which needs one attention kind for all draft layers)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="hidden states written by `speculators datagen`")
    g.add_argument("--total-seq-len", type=int, default=8192, help="tokens per packed row")
    g.add_argument("--rows-per-batch", type=int, default=1, help="packed rows per process per step")
    g.add_argument("--batches-per-step", type=int, default=None,
                   help="packed batches per optimizer step over all processes (default: world size)")
    g.add_argument("--train-data-ratio", type=float, default=0.9, help="training fraction; the rest validates")
    g.add_argument("--on-corrupt", choices=["skip", "raise"], default="skip",
                   help="a corrupt sample file: skip it with a warning naming it, or stop")
    g.add_argument("--data-source", default=None, help="sample store to use (default: disk, or online if its flags are set)")

    _add_online_arguments(p)

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--scheduler", choices=["cosine", "linear", "none"], default="cosine")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: --warmup-ratio of all steps")
    g.add_argument("--warmup-ratio", type=float, default=0.05)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--ttt-steps", type=int, default=3, help="times the draft is unrolled per position")
    g.add_argument("--ttt-step-loss-decay", type=float, default=1.0, help="loss weight of step k is decay**k")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--attn-impl", choices=["auto", "sdpa", "flex"], default="auto",
                   help="TTT attention: flex (CUDA default) or masked SDPA (CPU default)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16 also autocasts on the CPU "
                   "(about 2x faster for drafts of hidden size >= 1024 on CPUs with bf16 matmuls)")
    g.add_argument("--optimizer-impl", choices=["auto", "fused", "foreach"], default="auto",
                   help="AdamW kernel: auto = fused in one process (4x faster step on the CPU), "
                   "foreach under torchrun/FSDP2")
    g.add_argument("--loss-impl", choices=["fused", "chunked", "eager"], default="fused",
                   help="draft lm_head + KL: fused keeps only the logits for backward (default); "
                   "chunked keeps no [tokens, vocab] tensor and recomputes logits in backward "
                   "(for very long rows); eager is plain autograd (2-4x fused's memory)")
    g.add_argument("--loss-chunk-rows", type=int, default=0,
                   help="rows per chunk of the fused/chunked loss (bounds its float32 temporaries); "
                   "0 = automatic: about 1M elements per chunk on the CPU, 32M on GPUs")
    g.add_argument("--num-workers", type=int, default=0)

    g = p.add_argument_group("output")
    g.add_argument("--save-path", default="./output/checkpoints", help="checkpoint directory")
    g.add_argument("--no-resume-from-checkpoint", action="store_true",
                   help="start fresh; refuses a save path that holds checkpoints")
    g.add_argument("--logger", choices=["trackio", "wandb", "tensorboard"], default=None)
    g.add_argument("--log-dir", default="./logs")
    g.add_argument("--run-name", default=None)
    g.add_argument("--log-freq", type=int, default=1, help="console line every N steps")
    g.add_argument("--checkpoint-every-steps", type=int, default=0,
                   help="also checkpoint every N optimizer steps (<save-path>/<epoch>-step<N>); 0 = only at "
                   "epoch ends. SIGTERM/SIGINT always checkpoint the current step before exiting")
    g.add_argument("--keep-last-checkpoints", type=int, default=0,
                   help="keep only the newest K checkpoints (the best is never deleted); 0 = keep all")
    g.add_argument("--metrics-file", default=None, help="JSONL metrics stream (default <save-path>/metrics.jsonl)")


def _add_online_arguments(p: argparse.ArgumentParser) -> None:
    """Online-mode flags come from speculators.online (its owner defines them)."""
    from speculators.online.cli_args import add_online_args

    add_online_args(p)


_NOT_CONFIG = {"func", "passthrough", "command", "log_level", "no_resume_from_checkpoint"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    values = {k: getattr(args, k) for k in fields if hasattr(args, k) and k != "extra"}
    values["resume"] = not args.no_resume_from_checkpoint
    values["extra"] = {k: v for k, v in vars(args).items() if k not in fields and k not in _NOT_CONFIG}
    return TrainConfig(**values)


def run_from_args(args: argparse.Namespace) -> int:
    from speculators.train.trainer import run_training

    summary = run_training(config_from_args(args))
    # Stopped by SIGTERM/SIGINT (after checkpointing): not a success, the shell's code for it.
    return 128 + summary["signal"] if summary.get("signal") else 0
