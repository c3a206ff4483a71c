"""Everything a training run is made of, built once from its settings, before the loop starts.

`build_components(cfg, info)` reads the verifier and the data, decides between a fresh run
and a resume (rank 0 decides, every rank follows), builds the draft (from the verifier, from
`--from-pretrained` or from the checkpoint being resumed), wraps it in the TTT objective
(FSDP2 under torchrun), and builds the optimizer, the LR schedule, the step data, the
acceptance probe (the fixed held-out prompts, the verifier) and the metrics sink. Every input
is checked here, so a run that fails to start claims no save path.
The `Trainer` receives the result and only runs the loop.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speculators.data.sample_store import SampleStore
from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.train import checkpoint as ckpt
from speculators.config.train import TrainConfig
from speculators.train.acceptance import AcceptanceProbe
from speculators.train.data_source import build_sample_store
from speculators.train.distributed import DistInfo, on_main_rank, shard
from speculators.train.loggers import ExperimentLogger
from speculators.train.objective import TTTObjective
from speculators.train.optimizers import build_optimizer
from speculators.train.schedule import build_scheduler
from speculators.train.sink import MetricsSink
from speculators.train.step_data import StepData
from speculators.train.verifier import VerifierHead
from speculators.train.vocab import check_mapping, load_vocab_mapping
from speculators.verifier import load_verifier_weights, read_verifier_config

logger = logging.getLogger("speculators.train")


@dataclass
class Components:
    """The built parts of one run; `close` releases what outlives a failed run."""

    cfg: TrainConfig
    info: DistInfo
    run_id: str
    run_name: str
    resume_dir: Path | None
    store: SampleStore
    draft: Eagle3DraftModel
    objective: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: StepData
    sink: MetricsSink
    autocast: bool
    acceptance: AcceptanceProbe | None

    def close(self) -> None:
        self.sink.close()
        close_store(self.store)


def close_store(store: SampleStore) -> None:
    # An online store's prefetch requests must not outlive a failed run (they retry for minutes).
    store.close()


# ------------------------------------------------------------------ rules
def autocast_enabled(precision: str, device: torch.device) -> bool:
    """bf16 autocast on CUDA by default; on the CPU only when asked (`--precision bf16`)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision {precision!r}: choose auto, bf16 or fp32")
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


def adamw_kernel(impl: str, world_size: int) -> dict[str, bool]:
    """AdamW keyword for its kernel: fused is ~4x faster per step, foreach is what FSDP2's
    DTensor parameters are tested with, so `auto` picks fused only for one process."""
    if impl not in ("auto", "fused", "foreach"):
        raise UserError(f"--optimizer-impl {impl!r}: choose auto, fused or foreach")
    if impl == "auto":
        impl = "fused" if world_size == 1 else "foreach"
    return {"fused": True} if impl == "fused" else {"foreach": True}


def batches_per_step(cfg: TrainConfig, info: DistInfo) -> int:
    """Packed batches per optimizer step over all processes (default: one per process)."""
    bps = cfg.batches_per_step or info.world_size
    if bps % info.world_size:
        raise UserError(f"--batches-per-step {bps} must be a multiple of the world size {info.world_size}")
    return bps


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_pretrained(draft: Eagle3DraftModel, vconf: Any, source: Path, cfg: TrainConfig) -> None:
    """A draft loaded from `source` must fit the verifier and the flags that shape it."""
    c = draft.config
    if c.hidden_size != vconf.hidden_size or c.vocab_size != vconf.vocab_size:
        raise UserError(
            f"{source}: draft hidden/vocab size {c.hidden_size}/{c.vocab_size} do not match the verifier's "
            f"{vconf.hidden_size}/{vconf.vocab_size}"
        )
    if cfg.draft_vocab_size is not None and c.draft_vocab_size != cfg.draft_vocab_size:
        raise UserError(f"{source}: draft vocab {c.draft_vocab_size} disagrees with --draft-vocab-size {cfg.draft_vocab_size}")
    check_mapping(draft.d2t, draft.t2d, vconf.vocab_size, c.draft_vocab_size)
    for key in ("draft_arch", "norm_before_fc", "fc_norm", "norm_output"):
        asked, default = getattr(cfg, key), TrainConfig.model_fields[key].default
        if asked != default and asked != getattr(c, key):
            raise UserError(f"{source}: the checkpoint has {key}={getattr(c, key)!r}, --{key.replace('_', '-')} asks "
                            f"for {asked!r}; the draft's layout comes from the checkpoint, drop the flag")
    if cfg.sliding_window and cfg.sliding_window != c.sliding_window:
        raise UserError(f"{source}: the checkpoint has sliding_window={c.sliding_window!r}, --sliding-window asks "
                        f"for {cfg.sliding_window}; drop the flag")
    if c.embed_requires_grad:
        raise UserError(
            f"{source}: embed_requires_grad is true but this trainer keeps the embedding frozen; "
            "set it to false in config.json to continue with a frozen embedding"
        )


def set_lm_head_trainable(draft: torch.nn.Module, freeze: bool) -> None:
    """`--freeze-lm-head`: the draft's lm_head keeps the weights it starts with (the verifier's rows
    of the draft vocabulary for a new draft). A frozen weight gets no gradient (autograd skips the
    `[V, tokens] x [tokens, H]` weight-gradient matmul), is left out of the optimizer and its state,
    and is still saved with the draft."""
    draft.lm_head.weight.requires_grad_(not freeze)


# ------------------------------------------------------------------ builders
def build_draft(cfg: TrainConfig, vconf: Any, weights: dict[str, torch.Tensor], layer_ids: list[int],
                source: Path | None) -> Eagle3DraftModel:
    """The draft: loaded from `source` (a checkpoint), else new with the verifier's embedding and lm_head."""
    if source is not None:
        draft = Eagle3DraftModel.from_pretrained(source)
        check_pretrained(draft, vconf, source, cfg)
        if cfg.d2t_path or cfg.t2d_path:
            d2t, t2d = load_vocab_mapping(cfg.d2t_path, cfg.t2d_path, None, vconf.vocab_size, cfg.draft_vocab_size)
            if not (torch.equal(d2t, draft.d2t) and torch.equal(t2d, draft.t2d)):
                raise UserError(f"--d2t-path/--t2d-path differ from the mapping stored in {source}; drop them")
        draft.config.speculative_tokens = cfg.ttt_steps
    else:
        d2t, t2d = load_vocab_mapping(cfg.d2t_path, cfg.t2d_path, cfg.data_path, vconf.vocab_size, cfg.draft_vocab_size)
        verifier_ref = cfg.verifier_name_or_path
        if Path(verifier_ref).is_dir():
            verifier_ref = str(Path(verifier_ref).resolve())
        config = Eagle3Config.from_verifier_config(
            vconf,
            draft_vocab_size=int(d2t.shape[0]),
            num_layers=cfg.num_layers,
            norm_before_residual=cfg.norm_before_residual,
            aux_layer_ids=layer_ids[:-1] if layer_ids else None,
            speculative_tokens=cfg.ttt_steps,
            verifier_name_or_path=verifier_ref,
            draft_arch=cfg.draft_arch,
            norm_before_fc=cfg.norm_before_fc,
            fc_norm=cfg.fc_norm,
            norm_output=cfg.norm_output,
            sliding_window=cfg.sliding_window,
            full_attention_indices=cfg.full_attention_indices,
        )
        draft = Eagle3DraftModel(config)
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(weights["embed"])
            draft.lm_head.weight.copy_(weights["lm_head"][t2d])
            draft.set_vocab_mapping(d2t, t2d)
    draft.attn_impl = cfg.attn_impl
    draft.gradient_checkpointing = cfg.gradient_checkpointing
    if draft.config.layer_types and len(set(draft.config.layer_types)) > 1:
        logger.warning("draft layers mix sliding-window and full attention (%s): trained and evaluated here, "
                       "but vLLM cannot serve such a draft (one KV-cache group for all draft layers)",
                       draft.config.layer_types)
    return draft


def build_dflash_draft(cfg: TrainConfig, vconf: Any, weights: dict[str, torch.Tensor], layer_ids: list[int],
                       source: Path | None):
    """A DFlash draft: loaded from `source`, else new on the data's aux layers with the verifier's
    embedding (frozen) and lm_head; block = anchor + --ttt-steps slots."""
    from speculators.models.dflash import DFlashConfig, DFlashDraftModel
    from speculators.models.drafts import check_algorithm

    if source is not None:
        check_algorithm(source, "dflash")
        draft = DFlashDraftModel.from_pretrained(source)
        c = draft.config
        if c.hidden_size != vconf.hidden_size or c.vocab_size != vconf.vocab_size:
            raise UserError(f"{source}: draft hidden/vocab size {c.hidden_size}/{c.vocab_size} do not match the "
                            f"verifier's {vconf.hidden_size}/{vconf.vocab_size}")
        if c.block_size != cfg.ttt_steps + 1:
            raise UserError(f"{source}: the checkpoint drafts {c.block_size - 1} tokens per block, --ttt-steps asks "
                            f"for {cfg.ttt_steps}; pass --ttt-steps {c.block_size - 1}")
        if list(c.aux_layer_ids) != list(layer_ids[:-1]):
            raise UserError(f"{source}: the checkpoint reads verifier layers {c.aux_layer_ids}, the data holds "
                            f"{layer_ids[:-1]}")
        check_mapping(draft.d2t, draft.t2d, vconf.vocab_size, c.draft_vocab_size)
        return draft
    d2t, t2d = load_vocab_mapping(cfg.d2t_path, cfg.t2d_path, cfg.data_path, vconf.vocab_size, cfg.draft_vocab_size)
    verifier_ref = cfg.verifier_name_or_path
    if Path(verifier_ref).is_dir():
        verifier_ref = str(Path(verifier_ref).resolve())
    config = DFlashConfig.from_verifier_config(
        vconf, aux_layer_ids=list(layer_ids[:-1]), block_size=cfg.ttt_steps + 1, mask_token_id=cfg.mask_token_id,
        draft_vocab_size=int(d2t.shape[0]), num_layers=cfg.num_layers, verifier_name_or_path=verifier_ref)
    draft = DFlashDraftModel(config)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(weights["embed"])
        draft.lm_head.weight.copy_(weights["lm_head"][t2d])
        draft.set_vocab_mapping(d2t, t2d)
    return draft


def build_objective(cfg: TrainConfig, draft, head: VerifierHead) -> torch.nn.Module:
    """The training objective of the algorithm: EAGLE-3's TTT unroll or DFlash's blocks."""
    if cfg.algorithm == "dflash":
        from speculators.train.dflash_objective import DFlashObjective

        return DFlashObjective(draft, head, cfg.loss_impl, cfg.loss_chunk_rows, cfg.dflash_num_anchors)
    return TTTObjective(draft, head, cfg.loss_impl, cfg.loss_chunk_rows, cfg.loss, cfg.lk_eta)


def build_components(cfg: TrainConfig, info: DistInfo) -> Components:
    """Build every part of a run from its settings (see the module docstring)."""
    if cfg.attn_impl == "flex" and info.device.type != "cuda":
        raise UserError("--attn-impl flex needs a CUDA device (flex attention has no CPU backward); use sdpa")
    conflicts = cfg.option_conflicts()
    if conflicts:
        raise UserError("; ".join(conflicts.values()))
    autocast = autocast_enabled(cfg.precision, info.device)
    bps = batches_per_step(cfg, info)
    seed_everything(cfg.seed)
    vconf = read_verifier_config(cfg.verifier_name_or_path)
    store = build_sample_store(cfg, vconf)
    try:
        return _build_around(cfg, info, vconf, store, autocast, bps)
    except BaseException:
        close_store(store)
        raise


def _build_around(cfg: TrainConfig, info: DistInfo, vconf: Any, store: SampleStore, autocast: bool, bps: int) -> Components:
    """Everything built around an open sample store (closed by the caller if this fails)."""
    layer_ids = store.layer_ids

    # Run identity / resume decision (rank 0 decides, everyone follows).
    args = cfg.to_dict()
    run_id, resume_dir = on_main_rank(lambda: ckpt.claim_save_path(cfg.save_path, args, cfg.resume), info)
    resume_dir = Path(resume_dir) if resume_dir else None

    weights = load_verifier_weights(cfg.verifier_name_or_path, vconf)
    source = resume_dir or (Path(cfg.from_pretrained) if cfg.from_pretrained else None)
    if cfg.algorithm == "dflash":
        draft = build_dflash_draft(cfg, vconf, weights, layer_ids, source)
    else:
        if source is not None and (source / "config.json").is_file():
            from speculators.models.drafts import check_algorithm

            check_algorithm(source, "eagle3")
        draft = build_draft(cfg, vconf, weights, layer_ids, source)
    set_lm_head_trainable(draft, cfg.freeze_lm_head)  # before sharding and the optimizer: both see it
    head = VerifierHead.from_weights(weights, draft.t2d, float(getattr(vconf, "rms_norm_eps", 1e-6)))
    objective = shard(build_objective(cfg, draft, head).to(info.device), info, bf16=autocast)
    named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = build_optimizer(named, cfg, adamw_kernel(cfg.optimizer_impl, info.world_size))
    data = StepData.build(store, cfg, info, bps, torch.bfloat16 if autocast else torch.float32)
    val_positions = data.val_ds.indices if data.val_ds is not None else []
    acceptance = AcceptanceProbe.build(cfg, info, store, val_positions, draft.config)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * data.total_steps)
    scheduler = build_scheduler(optimizer, data.total_steps, warmup, cfg.scheduler)
    run_name = cfg.run_name or Path(cfg.save_path).resolve().name
    trackers = ExperimentLogger(cfg.logger, cfg.log_dir, run_name, args) if info.is_main else ExperimentLogger(None, "", "", {})
    sink = MetricsSink(cfg.metrics_file or Path(cfg.save_path) / "metrics.jsonl", trackers, cfg.log_freq, info.is_main)
    if info.is_main:  # only once every input checked out, so a failed start claims nothing
        ckpt.write_run(cfg.save_path, run_id, args)
    return Components(cfg=cfg, info=info, run_id=run_id, run_name=run_name, resume_dir=resume_dir, store=store,
                      draft=draft, objective=objective, params=params, optimizer=optimizer, scheduler=scheduler,
                      data=data, sink=sink, autocast=autocast, acceptance=acceptance)
