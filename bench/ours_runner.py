"""Train our EAGLE-3 draft with our `Trainer.train_step` on a hidden-state directory.

The counterpart of `bench/public_runner.py`: same draft shape, same starting weights
(`bench/shared_init.py`), same data, same number of steps, constant LR, no weight decay,
grad-norm clip 1.0, AdamW. The trainer's components (draft, verifier head, optimizer, step
data) are built the way `build_components` does it, minus reading a verifier checkpoint (the
shapes here are synthetic), and handed to the `Trainer`; every step is the real
`Trainer.train_step` (collate, loss, backward, clip, optimizer, scheduler).

    python bench/ours_runner.py --data DIR --shape tiny --seq-len 256 --steps 20 --out r.json

Options: `--precision bf16` is the trainer's `--precision bf16` (CPU bf16 autocast),
`--fused-adamw` its `--optimizer-impl fused` (already the default in one process),
`--opt` both;
`--loss-impl` is the trainer's (eager = the code before the fused lm_head + KL).
`--profile N` profiles N extra steps with torch.profiler and adds a breakdown
(bench/breakdown.py); `--trace PATH` keeps the profiler's Chrome trace there (gzip).
`--dense-ttt` runs the TTT unroll at every position (before the counted-rows skip).
`--rows R` packs R rows per step (the trainer's --rows-per-batch). `--sync-every N` brings
the step stats to the host every N steps like the trainer's --sync-every-steps (default: 1
on the CPU, 8 on CUDA; the first `--sync-warmup` steps are synced one by one so warm-up
steps can be dropped): a window's wall time is shared equally by its steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import RssSampler, log, machine_info, peak_rss_mib  # noqa: E402
from configs import get_shape  # noqa: E402
from shared_init import apply_shared_init, init_tensor, vocab_mapping  # noqa: E402


def draft_config(shape):
    """Our `Eagle3Config` for a bench `DraftShape`."""
    from speculators.models.eagle3 import Eagle3Config

    return Eagle3Config(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.target_vocab,
        draft_vocab_size=shape.draft_vocab,
        num_layers=shape.num_layers,
        rms_norm_eps=shape.rms_norm_eps,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        norm_before_residual=True,
        speculative_tokens=shape.ttt_steps,
    )


def build_trainer(shape, data: str, seq_len: int, lr: float, seed: int, attn: str, precision: str, device: str, epochs: int,
                  freeze_lm_head: bool = False, fused_adamw: bool = False, loss_impl: str = "fused", rows: int = 1,
                  dense_ttt: bool = False):
    from speculators.data.formats import open_sample_store
    from speculators.models.eagle3 import Eagle3DraftModel
    from speculators.train.components import (Components, adamw_kernel, autocast_enabled, batches_per_step,
                                              seed_everything, set_lm_head_trainable)
    from speculators.config.train import TrainConfig
    from speculators.train.distributed import setup_distributed
    from speculators.train.loggers import ExperimentLogger
    from speculators.train.objective import TTTObjective
    from speculators.train.schedule import build_scheduler
    from speculators.train.sink import MetricsSink
    from speculators.train.step_data import StepData
    from speculators.train.trainer import Trainer
    from speculators.train.verifier import VerifierHead

    cfg = TrainConfig(
        verifier_name_or_path="synthetic",
        data_path=data,
        total_seq_len=seq_len,
        lr=lr,
        weight_decay=0.0,
        scheduler="none",
        warmup_steps=0,
        max_grad_norm=1.0,
        ttt_steps=shape.ttt_steps,
        ttt_step_loss_decay=1.0,
        train_data_ratio=0.95,
        seed=seed,
        epochs=epochs,
        device=device,
        attn_impl=attn,
        norm_before_residual=True,
        precision="bf16" if precision == "bf16" else "auto",
        optimizer_impl="fused" if fused_adamw else "auto",
        loss_impl=loss_impl,
        rows_per_batch=rows,
        freeze_lm_head=freeze_lm_head,
    )
    info = setup_distributed(cfg.device)
    autocast = autocast_enabled(cfg.precision, info.device)  # --precision: autocast and the data dtype
    seed_everything(cfg.seed)
    store = open_sample_store(data)
    config = draft_config(shape)
    draft = Eagle3DraftModel(config)
    init_stats = apply_shared_init(draft, seed=seed, rename=lambda n: None if n.startswith("rotary.") else n)
    d2t, t2d = vocab_mapping(shape.target_vocab, shape.draft_vocab)
    draft.set_vocab_mapping(d2t, t2d)
    draft.attn_impl = attn
    set_lm_head_trainable(draft, cfg.freeze_lm_head)  # the trainer's --freeze-lm-head (what the public package does)
    head = VerifierHead(
        torch.ones(shape.hidden_size),
        init_tensor("verifier_lm_head.weight", (shape.draft_vocab, shape.hidden_size), seed),
        shape.rms_norm_eps,
    )
    objective = TTTObjective(draft, head, cfg.loss_impl, cfg.loss_chunk_rows,
                             skip_uncounted=not dense_ttt).to(info.device)
    params = [p for p in objective.parameters() if p.requires_grad]
    # the optimizer kernel build_components picks (--optimizer-impl; fused in one process)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **adamw_kernel(cfg.optimizer_impl, 1))
    step_data = StepData.build(store, cfg, info, batches_per_step(cfg, info),
                               torch.bfloat16 if autocast else torch.float32)
    scheduler = build_scheduler(optimizer, step_data.total_steps, 0, "none")
    sink = MetricsSink("unused", ExperimentLogger(None, "", "", {}), cfg.log_freq, is_main=False)  # writes nothing
    tr = Trainer(Components(cfg=cfg, info=info, run_id="bench", run_name="bench", resume_dir=None, store=store,
                            draft=draft, objective=objective, params=params, optimizer=optimizer,
                            scheduler=scheduler, data=step_data, sink=sink, autocast=autocast,
                            acceptance=None))  # throughput only: no acceptance measurement
    return tr, init_stats


def iter_steps(tr, steps: int):
    """Yield `steps` training batches the way `Trainer.fit` produces them (epoch plans, its
    DataLoader over packed steps); the time to fetch each one is part of the step."""
    done, epoch = 0, 0
    while done < steps:  # past --epochs if --steps asks for more: the epochs' plans go on
        plan = tr.data.plan(epoch)
        if not plan:
            raise SystemExit("the training split packs into no batches; add samples")
        for item in tr.data.epoch_loader(plan, epoch):
            yield item
            done += 1
            if done >= steps:
                return
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="hidden-state directory (format version 1 or safetensors)")
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="auto", help="our attn_impl: auto | sdpa | flex | flex_eager")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32: what our trainer does on the CPU; bf16: CPU autocast experiment")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) (proposal)")
    ap.add_argument("--opt", action="store_true",
                    help="the recommended proposals: --precision bf16 (CPU) and --fused-adamw")
    ap.add_argument("--loss-impl", choices=["fused", "chunked", "eager"], default="fused",
                    help="the trainer's --loss-impl (fused is its default; eager is the pre-fusion code)")
    ap.add_argument("--dense-ttt", action="store_true",
                    help="run the TTT unroll at every position (the code before the counted-rows skip)")
    ap.add_argument("--freeze-lm-head", action="store_true",
                    help="the trainer's --freeze-lm-head: lm_head frozen like the public package does")
    ap.add_argument("--profile", type=int, default=0, help="profile this many extra steps")
    ap.add_argument("--trace", default=None, help="write the profiled steps' Chrome trace here (.json.gz)")
    ap.add_argument("--rows", type=int, default=1, help="packed rows per step (--rows-per-batch)")
    ap.add_argument("--sync-every", type=int, default=0, help="host sync every N steps (0: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--sync-warmup", type=int, default=3, help="first steps synced one by one")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.opt:
        a.fused_adamw = True
        if not torch.cuda.is_available():
            a.precision = "bf16"
    shape = get_shape(a.shape, a.seq_len)
    log(f"ours: shape={shape.name} seq={a.seq_len} steps={a.steps} attn={a.attn} precision={a.precision}")
    t0 = time.perf_counter()
    tr, init_stats = build_trainer(shape, a.data, a.seq_len, a.lr, a.seed, a.attn, a.precision, a.device, epochs=1,
                                   freeze_lm_head=a.freeze_lm_head, fused_adamw=a.fused_adamw,
                                   loss_impl=a.loss_impl, rows=a.rows, dense_ttt=a.dense_ttt)
    build_s = time.perf_counter() - t0
    from speculators.train.losses import summarize

    dev = tr.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = []
    every = a.sync_every or (8 if dev.type == "cuda" else 1)
    with RssSampler() as rss:
        stream = iter_steps(tr, a.steps)
        window = []
        sync(dev)
        start = time.perf_counter()
        for i in range(a.steps):
            batch = next(stream)  # data loading + collate is part of the step, as in fit()
            stats, tokens = tr.train_step(batch)  # both stay where they are: no sync
            window.append((stats, float(tokens)))  # one process: tokens counted on the host batch
            if i < a.sync_warmup or len(window) == every or i == a.steps - 1:
                host = torch.stack([s for s, _ in window]).cpu()  # the window's one sync
                dt = (time.perf_counter() - start) / len(window)
                for s, tok in zip(host, (t for _, t in window)):
                    metrics = summarize(s, tr.cfg.ttt_step_loss_decay)
                    steps.append({"step": len(steps) + 1, "loss": metrics["loss"], "metrics": metrics,
                                  "tokens": tok, "step_s": dt, "tokens_per_s": tok / dt, "window": len(window)})
                window = []
                start = time.perf_counter()
    out = {
        "impl": "ours",
        "shape": shape.to_dict(),
        "seq_len": a.seq_len,
        "steps": steps,
        "build_s": build_s,
        "trainable_params": sum(p.numel() for p in tr.params),
        "peak_rss_mib": peak_rss_mib(),
        "train_peak_rss_mib": rss.peak,
        "init": init_stats,
        "options": {"attn": tr.draft.attn_impl, "fused_adamw": a.fused_adamw, "loss_impl": a.loss_impl, "rows": a.rows, "sync_every": every, "precision": a.precision, "device": str(dev), "optimizer": "adamw",
                    "weight_decay": 0.0, "scheduler": "none", "lm_head_trainable": tr.draft.lm_head.weight.requires_grad,
                    "dense_ttt": a.dense_ttt},
        "machine": machine_info(),
    }
    if dev.type == "cuda":
        out["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if a.profile:
        from breakdown import profile_steps

        out["profile"] = profile_steps(tr, iter_steps(tr, a.profile + 1), a.profile, dev, trace_path=a.trace)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    log(f"ours: {len(steps)} steps written to {a.out}")
    return out


if __name__ == "__main__":
    main()
