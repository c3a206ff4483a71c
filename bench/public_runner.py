"""Train the public `speculators` package's EAGLE-3 draft with its own Trainer, on the CPU.

Runs inside bench/.venv-public (made by bench/setup_public_venv.sh); `speculators` here
is the PyPI package, imported at run time, never copied. Called by bench/side_by_side.py:

    bench/.venv-public/bin/python -P bench/public_runner.py --data DIR --shape tiny \
        --seq-len 256 --steps 20 --out result.json

What runs is theirs: `Eagle3DraftModel`, their data loaders over their on-disk layout
(`bench/to_public_format.py` converts our data), their `Trainer.train_epoch` loop
(autocast, backward, grad clipping, AdamW, metrics) and their eager loss functions.
What this harness changes to make it run without CUDA, and nothing else:

1. The model is built from a config instead of from a verifier checkpoint, and its
   weights come from `bench/shared_init.py` (identical to ours at step 0).
2. `Trainer.setup_model` is overridden to leave the model on the CPU: upstream calls
   `model.to(local_rank)`, i.e. `cuda:0`, and batches are moved with `.to(local_rank)`,
   so `local_rank` is set to "cpu".
3. `torch.accelerator.synchronize` is a no-op when no accelerator exists (their step
   timer calls it; on the CPU every op is already synchronous).
4. Their CPU-capable options are selected: `draft_attn_impl` = "sdpa" (the default
   "simple_flex_attention" has no backward on the CPU in torch 2.13: "FlexAttention does
   not support backward on CPU") and loss implementation "eager" (the default "fused" loss
   is a Triton kernel).
5. `--precision fp32` uses their `hidden_states_dtype=float32` and leaves autocast off
   (their CPU fallback device type "cuda" disables it); `bf16` autocasts on the CPU.

On a CUDA machine none of 2-5 applies: their Trainer runs unmodified with its defaults
(flex attention, fused Triton loss, bf16 autocast); the public venv then needs a CUDA
build of torch (bench/setup_public_venv.sh installs the CPU wheel found on this machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ helpers only; bench/ has no `speculators` package

import torch  # noqa: E402

from common import RssSampler, log, machine_info, peak_rss_mib  # noqa: E402
from configs import get_shape  # noqa: E402
from shared_init import apply_shared_init, vocab_mapping  # noqa: E402


def _check_public_import() -> str:
    import importlib.metadata as md

    import speculators

    where = Path(speculators.__file__).resolve()
    if str(where).startswith(str(HERE.parent / "speculators")):
        raise SystemExit(f"imported our own speculators from {where}; run with -P from the public venv")
    return md.version("speculators")


def build_model(shape, attn_impl: str, seed: int):
    from transformers import LlamaConfig

    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3SpeculatorConfig
    from speculators.models.eagle3.core import Eagle3DraftModel
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    # Mirrors the fields their `create_transformer_layer_config` sets for a Llama draft.
    tl = LlamaConfig(
        vocab_size=shape.target_vocab,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        head_dim=shape.head_dim,
        tie_word_embeddings=False,
    )
    tl.rope_parameters = {"rope_type": "default", "rope_theta": shape.rope_theta}
    tl._attn_implementation = attn_impl  # noqa: SLF001
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=tl,
        draft_vocab_size=shape.draft_vocab,
        norm_before_residual=True,  # their CLI default (and ours)
        eagle_aux_hidden_state_layer_ids=[2, 16, 29],
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=shape.ttt_steps)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=None, architectures=["LlamaForCausalLM"]),
        ),
    )
    model = Eagle3DraftModel(config=config)
    d2t, t2d = vocab_mapping(shape.target_vocab, shape.draft_vocab)
    model.load_vocab_mappings(t2d, d2t)
    stats = apply_shared_init(model, seed=seed)
    return model, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory in the public layout (bench/to_public_format.py)")
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", choices=["sdpa", "flex", "eager"], default=None,
                    help="default: sdpa on the CPU, flex (their default) on CUDA")
    ap.add_argument("--loss-implementation", choices=["eager", "fused"], default=None,
                    help="default: eager on the CPU, fused (their default, Triton) on CUDA")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="their DataLoader workers; default: 12 (their default) on CUDA, 0 on the CPU")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: autocast on the CPU in bf16 (their GPU path's precision); fp32: their "
                    "--hidden-states-dtype float32 with their device_type left alone ('cuda' without an "
                    "accelerator), which disables autocast, so everything runs in fp32 like our CPU path")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    version = _check_public_import()
    shape = get_shape(a.shape, a.seq_len)

    on_gpu = torch.cuda.is_available()
    a.attn = a.attn or ("flex" if on_gpu else "sdpa")
    a.loss_implementation = a.loss_implementation or ("fused" if on_gpu else "eager")
    if a.num_workers is None:
        a.num_workers = 12 if on_gpu else 0
    if not torch.accelerator.is_available():
        torch.accelerator.synchronize = lambda *args, **kwargs: None  # (3) above

    log(f"public speculators {version}: shape={shape.name} seq={a.seq_len} steps={a.steps} attn={a.attn} "
        f"loss={a.loss_implementation} precision={a.precision}")
    from speculators.losses import resolve_loss_config
    from speculators.models.eagle3.data import shift_batch
    from speculators.train.dataloader import create_train_val_loaders
    from speculators.train.trainer import Trainer, TrainerConfig

    torch.manual_seed(a.seed)
    attn_impl = {"sdpa": "sdpa", "eager": "eager", "flex": "simple_flex_attention"}[a.attn]
    t0 = time.perf_counter()
    model, init_stats = build_model(shape, attn_impl, a.seed)
    build_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    hs_dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    train_loader, _val_loader = create_train_val_loaders(
        data_path=a.data,
        total_seq_len=a.seq_len,
        hidden_states_dtype=hs_dtype,
        transfer=None,
        vllm_endpoint="http://127.0.0.1:1/v1",  # never contacted: every sample is cached
        on_missing="raise",
        verifier_name_or_path=None,
        request_timeout=1.0,
        max_retries=0,
        generation_validation_retries=0,
        max_consecutive_generation_failures=1,
        hidden_size=shape.hidden_size,
        num_target_layers=shape.num_aux_layers,
        num_workers=a.num_workers,
        prefetch_factor=2,
        preprocess=shift_batch,
        train_data_ratio=0.95,
        seed=a.seed,
    )

    loss_config = resolve_loss_config("kl_div", a.loss_implementation)
    call_kwargs = {"ttt_steps": shape.ttt_steps, "ttt_step_loss_decay": 1.0, "loss_config": loss_config}
    save_dir = tempfile.mkdtemp(prefix="public-spec-")
    cfg = TrainerConfig(
        lr=a.lr,
        num_epochs=10_000,
        save_path=save_dir,
        train_call_kwargs=call_kwargs,
        val_call_kwargs=call_kwargs,
        scheduler_type="none",
        weight_decay=0.0,
        hidden_states_dtype=hs_dtype,
        log_freq=1,
        max_steps=a.steps,
    )

    class CpuTrainer(Trainer):
        def setup_model(self):  # (2) above: upstream moves the model to cuda:<local_rank>
            self.local_rank = "cpu"
            if a.precision == "bf16":
                self.device_type = "cpu"

    # On CUDA their Trainer runs unmodified (model on cuda:0, their autocast).
    trainer = Trainer(model, cfg, train_loader, None) if on_gpu else CpuTrainer(model, cfg, train_loader, None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    records: list[dict] = []

    class Capture(logging.Handler):
        def emit(self, record):
            if isinstance(record.msg, dict) and "train" in record.msg:
                records.append({"train": record.msg["train"], "profile": record.msg.get("profile")})

    mlog = logging.getLogger("speculators.metrics")
    mlog.setLevel(logging.INFO)
    mlog.addHandler(Capture())
    mlog.propagate = False

    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step():
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    with RssSampler() as rss:
        epoch = 0
        last[0] = time.perf_counter()
        while trainer.global_step < a.steps:
            trainer.train_epoch(epoch, step_callback=on_step)
            epoch += 1

    steps = []
    for i, r in enumerate(records):
        prof = r["profile"] or {}
        steps.append({
            "step": i + 1,
            "loss": r["train"].get("loss"),
            "metrics": {k: v for k, v in r["train"].items() if isinstance(v, (int, float))},
            "step_s": prof.get("step_ms", float("nan")) / 1000,
            "fetch_s": prof.get("fetch_ms", float("nan")) / 1000,
            "fwd_s": prof.get("fwd_ms", float("nan")) / 1000,
            "bwd_s": prof.get("bwd_ms", float("nan")) / 1000,
            "opt_s": prof.get("opt_ms", float("nan")) / 1000,
            "tokens_per_s": prof.get("tokens_per_s"),
            "wall_s": step_times[i] if i < len(step_times) else None,
        })
    out = {
        "impl": "public",
        "package": f"speculators=={version}",
        "shape": shape.to_dict(),
        "seq_len": a.seq_len,
        "steps": steps,
        "build_s": build_s,
        "trainable_params": trainable,
        "peak_rss_mib": peak_rss_mib(),
        "train_peak_rss_mib": rss.peak,
        "init": init_stats,
        "options": {"attn": attn_impl, "loss_implementation": a.loss_implementation, "device": "cuda" if on_gpu else "cpu", "num_workers": a.num_workers,
                    "precision": a.precision, "optimizer": "adamw", "weight_decay": 0.0, "scheduler": "none",
                    "lm_head_trainable": bool(model.lm_head.weight.requires_grad)},
        "machine": machine_info(),
    }
    if on_gpu:
        out["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    log(f"public: {len(steps)} steps written to {a.out}")
    import shutil

    shutil.rmtree(save_dir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
