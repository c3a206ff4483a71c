"""The training loop: build the draft from the verifier, TTT-train it, validate, checkpoint.

Batches: each epoch the packed batch sampler (speculators.data) is run once over the whole
training split with the epoch's seed; consecutive groups of `batches_per_step` batches form
one optimizer step and rank `r` takes batches `r, r + W, ...` of the group.  Because the loss
is normalised by the global count of counted positions, a step's update does not depend
on the world size: `torchrun --nproc_per_node 2` matches one process with
`batches_per_step=2` up to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.train import checkpoint as ckpt
from speculators.config.train import TrainConfig
from speculators.train.data_source import build_sample_store
from speculators.train.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    setup_distributed,
    shard,
)
from speculators.train.interrupt import StopRequest, signal_name
from speculators.train.lm_head_kl import LOSS_IMPLS
from speculators.train.loggers import ExperimentLogger, metrics_line
from speculators.train.losses import STAT_FIELDS, summarize
from speculators.train.metrics_stream import MetricsStream
from speculators.train.objective import TTTObjective, step_token_counts
from speculators.train.schedule import build_scheduler
from speculators.train.verifier import VerifierHead
from speculators.verifier import load_verifier_weights, read_verifier_config
from speculators.train.vocab import check_mapping, load_vocab_mapping

logger = logging.getLogger("speculators.train")


# --------------------------------------------------------------------- data
def check_data_against_verifier(data_config: dict[str, Any], vconf: Any, cfg: TrainConfig) -> list[int]:
    """Validate the hidden-state data for this verifier; return its layer ids."""
    where = f"{cfg.data_path or cfg.hidden_states_path}/data_config.json"
    if "hidden_size" in data_config and int(data_config["hidden_size"]) != int(vconf.hidden_size):
        raise UserError(
            f"{where}: hidden_size {data_config['hidden_size']} does not match the verifier's {vconf.hidden_size}; "
            "the data was generated with another model"
        )
    n_layers = data_config.get("num_hidden_layers")
    if n_layers is not None and int(n_layers) != int(vconf.num_hidden_layers):
        raise UserError(
            f"{where}: num_hidden_layers {n_layers} does not match the verifier's {vconf.num_hidden_layers}; "
            "the data was generated with another model"
        )
    layer_ids = [int(x) for x in data_config.get("layer_ids") or []]
    if not layer_ids and data_config.get("num_layers") not in (None, 4):
        raise UserError(
            f"{where}: the data holds {data_config['num_layers']} layers but names no layer ids (data format "
            "version 0); write its layer ids into data_config.json (hidden_states.layer_ids), or convert it with "
            "`speculators convert-data --data-format-version 0 --to pt` and record them there"
        )
    if layer_ids:
        from speculators.layers import check_layer_ids

        # The same rules datagen, launch-vllm and Eagle3Config apply (any number of aux layers >= 1).
        check_layer_ids(layer_ids, vconf.num_hidden_layers, flag=f"{where}: layer_ids")
    return layer_ids


def plan_epoch(sampler_factory, epoch: int, batches_per_step: int) -> list[list[list[int]]]:
    """Global steps of one epoch: each a list of `batches_per_step` index lists (tail dropped)."""
    sampler = sampler_factory()
    sampler.set_epoch(epoch)
    batches = list(sampler)
    n = len(batches) // batches_per_step
    return [batches[i * batches_per_step : (i + 1) * batches_per_step] for i in range(n)]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


class _StepBatches(torch.utils.data.Dataset):
    """Item `s` = this rank's collated batch of global step `s` (lets DataLoader workers prefetch)."""

    def __init__(self, ds, steps: list[list[list[int]]], collate, rank: int, world: int):
        self.ds, self.steps, self.collate, self.rank, self.world = ds, steps, collate, rank, world

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, s: int) -> dict[str, torch.Tensor]:
        mine = self.steps[s][self.rank :: self.world]
        return self.collate([self.ds[i] for idx in mine for i in idx])


# ------------------------------------------------------------------ precision, optimizer
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


def loader_workers(requested: int | None, device: torch.device, online: bool) -> int:
    """DataLoader workers for a training epoch.

    Unset: 4 on CUDA for on-disk data, where reading and collating a step's hidden states
    (64 MiB per 2048 tokens at the 8B shape) took 45-50% of an H200 step without them
    (bench/results/train_gpu_*.json); 0 on the CPU, where workers take cores from the step, and
    for the online store, which prefetches over HTTP itself.
    """
    if requested is not None:
        return requested
    return 4 if device.type == "cuda" and not online else 0


# ------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo | None = None):
        self.cfg = cfg
        self.info = info or setup_distributed(cfg.device)
        self.device = self.info.device
        self.autocast = autocast_enabled(cfg.precision, self.device)
        self.data_dtype = torch.bfloat16 if self.autocast else torch.float32
        if cfg.ttt_steps < 1:
            raise UserError("--ttt-steps must be >= 1")
        if cfg.epochs < 1:
            raise UserError("--epochs must be >= 1")
        if cfg.num_layers < 1:
            raise UserError("--num-layers must be >= 1")
        for flag, value in (("--checkpoint-every-steps", cfg.checkpoint_every_steps),
                            ("--keep-last-checkpoints", cfg.keep_last_checkpoints)):
            if value is None or value < 0:
                raise UserError(f"{flag} must be >= 0 (0: {'only at epoch ends' if 'every' in flag else 'keep all'}), got {value}")
        if cfg.loss_impl not in LOSS_IMPLS:
            raise UserError(f"--loss-impl {cfg.loss_impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
        if cfg.loss_chunk_rows < 0:
            raise UserError(f"--loss-chunk-rows must be >= 0 (0: automatic), got {cfg.loss_chunk_rows}")
        if cfg.attn_impl == "flex" and self.device.type != "cuda":
            raise UserError("--attn-impl flex needs a CUDA device (flex attention has no CPU backward); use sdpa")
        bps = cfg.batches_per_step or self.info.world_size
        if bps % self.info.world_size:
            raise UserError(f"--batches-per-step {bps} must be a multiple of the world size {self.info.world_size}")
        self.batches_per_step = bps
        self.run_name = cfg.run_name or Path(cfg.save_path).resolve().name

    # ---------------------------------------------------------------- build
    def _seed(self) -> None:
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)

    def build(self) -> None:
        cfg = self.cfg
        self._seed()
        vconf = read_verifier_config(cfg.verifier_name_or_path)
        self.vconf = vconf
        self.store = build_sample_store(cfg)
        data_config = dict(getattr(self.store, "config", {}) or {})
        layer_ids = check_data_against_verifier(data_config, vconf, cfg)

        # Run identity / resume decision (rank 0 decides, everyone follows).
        args = cfg.to_dict()
        decision = None
        if self.info.is_main:
            decision = ckpt.claim_save_path(cfg.save_path, args, cfg.resume)
        self.run_id, resume_dir = broadcast_object(decision, self.info)
        self.resume_dir = Path(resume_dir) if resume_dir else None

        weights = load_verifier_weights(cfg.verifier_name_or_path, vconf)
        source = self.resume_dir or (Path(cfg.from_pretrained) if cfg.from_pretrained else None)
        if source is not None:
            draft = Eagle3DraftModel.from_pretrained(source)
            self._check_pretrained(draft, vconf, source)
            if cfg.d2t_path or cfg.t2d_path:
                d2t, t2d = load_vocab_mapping(cfg.d2t_path, cfg.t2d_path, None, vconf.vocab_size, cfg.draft_vocab_size)
                if not (torch.equal(d2t, draft.d2t) and torch.equal(t2d, draft.t2d)):
                    raise UserError(f"--d2t-path/--t2d-path differ from the mapping stored in {source}; drop them")
            t2d = draft.t2d
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
        if draft.config.layer_types and len(set(draft.config.layer_types)) > 1:
            logger.warning("draft layers mix sliding-window and full attention (%s): trained and evaluated here, "
                        "but vLLM cannot serve such a draft (one KV-cache group for all draft layers)",
                        draft.config.layer_types)
        head = VerifierHead.from_weights(weights, t2d, float(getattr(vconf, "rms_norm_eps", 1e-6)))
        self.draft = draft
        objective = TTTObjective(draft, head, cfg.loss_impl, cfg.loss_chunk_rows)
        self.objective = shard(objective.to(self.device), self.info, bf16=self.autocast)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
            **adamw_kernel(cfg.optimizer_impl, self.info.world_size),
        )
        self._build_data()
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, warmup, cfg.scheduler)
        if self.info.is_main:  # only once every input checked out, so a failed start claims nothing
            ckpt.write_run(cfg.save_path, self.run_id, args)

    def _check_pretrained(self, draft: Eagle3DraftModel, vconf: Any, source: Path) -> None:
        c = draft.config
        if c.hidden_size != vconf.hidden_size or c.vocab_size != vconf.vocab_size:
            raise UserError(
                f"{source}: draft hidden/vocab size {c.hidden_size}/{c.vocab_size} do not match the verifier's "
                f"{vconf.hidden_size}/{vconf.vocab_size}"
            )
        if self.cfg.draft_vocab_size is not None and c.draft_vocab_size != self.cfg.draft_vocab_size:
            raise UserError(f"{source}: draft vocab {c.draft_vocab_size} disagrees with --draft-vocab-size {self.cfg.draft_vocab_size}")
        check_mapping(draft.d2t, draft.t2d, vconf.vocab_size, c.draft_vocab_size)
        for key in ("draft_arch", "norm_before_fc", "fc_norm", "norm_output"):
            asked, default = getattr(self.cfg, key), TrainConfig.model_fields[key].default
            if asked != default and asked != getattr(c, key):
                raise UserError(f"{source}: the checkpoint has {key}={getattr(c, key)!r}, --{key.replace('_', '-')} asks "
                                f"for {asked!r}; the draft's layout comes from the checkpoint, drop the flag")
        if self.cfg.sliding_window and self.cfg.sliding_window != c.sliding_window:
            raise UserError(f"{source}: the checkpoint has sliding_window={c.sliding_window!r}, --sliding-window asks "
                            f"for {self.cfg.sliding_window}; drop the flag")
        if c.embed_requires_grad:
            raise UserError(
                f"{source}: embed_requires_grad is true but this trainer keeps the embedding frozen; "
                "set it to false in config.json to continue with a frozen embedding"
            )

    def _build_data(self) -> None:
        from speculators.data.dataset import Eagle3Collator, Eagle3Dataset, PackedBatchSampler, split_indices

        cfg = self.cfg
        train_idx, val_idx = split_indices(len(self.store), 1.0 - cfg.train_data_ratio, cfg.seed)
        self.train_ds = Eagle3Dataset(self.store, max_len=cfg.total_seq_len, indices=train_idx, dtype=self.data_dtype)
        self.val_ds = Eagle3Dataset(self.store, max_len=cfg.total_seq_len, indices=val_idx, dtype=self.data_dtype) if val_idx else None
        self.collate = Eagle3Collator(cfg.total_seq_len, pack=True)
        train_lengths = self._lengths(self.train_ds)
        self._train_sampler = lambda: PackedBatchSampler(
            train_lengths, cfg.total_seq_len, rows=cfg.rows_per_batch, shuffle=True, seed=cfg.seed
        )
        self.plans = {}
        self.steps_per_epoch = []
        for e in range(cfg.epochs):
            self.steps_per_epoch.append(len(plan_epoch(self._train_sampler, e, self.batches_per_step)))
        if self.steps_per_epoch[0] == 0:
            raise UserError(
                f"the training split packs into fewer than {self.batches_per_step} batches; add data, lower "
                "--batches-per-step or run fewer processes"
            )
        self.total_steps = sum(self.steps_per_epoch)
        if self.val_ds is not None:
            val_sampler = PackedBatchSampler(self._lengths(self.val_ds), cfg.total_seq_len, rows=cfg.rows_per_batch, shuffle=False)
            self.val_batches = list(val_sampler)
        else:
            self.val_batches = []

    @staticmethod
    def _lengths(ds) -> list[int]:
        try:
            return ds.lengths()
        except UserError:
            return [ds[i]["length"] for i in range(len(ds))]

    # ---------------------------------------------------------------- state
    def _full_model_state(self) -> dict[str, torch.Tensor]:
        if self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = self.objective.state_dict()
        return {k[len("draft.") :]: v for k, v in state.items() if k.startswith("draft.")}

    def _full_optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.info.distributed)
        return get_optimizer_state_dict(self.objective, self.optimizer, options=opts)

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.objective, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    # ---------------------------------------------------------------- steps
    def _batch(self, index_lists: list[list[int]], ds) -> dict[str, torch.Tensor]:
        samples = [ds[i] for idx in index_lists for i in idx]
        return _to_device(self.collate(samples), self.device, self.data_dtype)

    def _forward(self, batch, denominators):
        ctx = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            return self.objective(batch, self.cfg.ttt_steps, self.cfg.ttt_step_loss_decay, denominators)

    def _denominators(self, batch) -> torch.Tensor:
        counts = step_token_counts(batch["loss_mask"], batch["document_ids"], self.cfg.ttt_steps)
        counts = all_reduce_sum(counts, self.info)
        return counts / self.info.world_size

    def _epoch_loader(self, plan: list[list[list[int]]]):
        w, r = self.info.world_size, self.info.rank
        prefetch = getattr(self.store, "prefetch", None)
        if prefetch is not None:  # online store: request this rank's samples in training order
            prefetch([self.train_ds.indices[i] for step in plan for idx in step[r::w] for i in idx])
        steps = _StepBatches(self.train_ds, plan, self.collate, r, w)
        return torch.utils.data.DataLoader(
            steps, batch_size=None, shuffle=False,
            num_workers=loader_workers(self.cfg.num_workers, self.device, online=prefetch is not None),
            pin_memory=self.device.type == "cuda",
        )

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        batch = _to_device(batch, self.device, self.data_dtype)
        tokens = torch.tensor(float((batch["document_ids"] != -1).sum()), device=self.device)
        denominators = self._denominators(batch)
        loss, stats = self._forward(batch, denominators)
        loss.backward()
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = all_reduce_sum(stats.detach().float(), self.info)
        tokens = all_reduce_sum(tokens, self.info)
        return stats, float(tokens)

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if not self.val_batches:
            return None
        self.objective.eval()
        w, r = self.info.world_size, self.info.rank
        total = torch.zeros(self.cfg.ttt_steps, len(STAT_FIELDS), device=self.device)
        tokens = torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        for s in range(math.ceil(len(self.val_batches) / w)):
            j = s * w + r
            real = j < len(self.val_batches)
            batch = self._batch([self.val_batches[j if real else 0]], self.val_ds)
            denominators = self._denominators(batch)
            _, stats = self._forward(batch, denominators)
            if real:  # every rank runs the same number of forwards (FSDP collectives)
                total += stats.float()
                tokens += (batch["document_ids"] != -1).sum()
        total = all_reduce_sum(total, self.info)
        tokens = all_reduce_sum(tokens, self.info)
        self.objective.train()
        metrics = summarize(total, self.cfg.ttt_step_loss_decay)
        metrics["tokens_per_s"] = float(tokens) / max(time.perf_counter() - t0, 1e-9)
        return metrics

    # ---------------------------------------------------------------- run
    def _resume_point(self) -> dict[str, Any]:
        """Where the loop starts: from scratch, after an epoch end, or inside an epoch."""
        point = {"epoch": 0, "done": 0, "global_step": 0, "best": {"val_loss": None, "epoch": None},
                 "epoch_stats": None, "rng": None, "name": None}
        if self.resume_dir is None:
            return point
        tstate = ckpt.load_trainer_state(self.resume_dir)
        self._load_optimizer_state(ckpt.load_optimizer_state(self.resume_dir))
        self.scheduler.load_state_dict(ckpt.load_scheduler_state(self.resume_dir))
        done = tstate.get("steps_done_in_epoch")
        point.update(
            epoch=int(tstate["epoch"]) + (1 if done is None else 0),
            done=int(done or 0),
            global_step=int(tstate["global_step"]),
            best={"val_loss": tstate.get("best_val_loss"), "epoch": tstate.get("best_epoch")},
            epoch_stats=tstate.get("epoch_stats"),
            rng=tstate["rng"],
            name=self.resume_dir.name,
        )
        return point

    def _reached_max_steps(self, global_step: int) -> bool:
        return self.cfg.max_steps is not None and global_step >= self.cfg.max_steps

    def _agreed_stop(self, stop: StopRequest) -> int | None:
        """The stop signal if any rank got one (all ranks must stop at the same step)."""
        flag = torch.tensor(float(stop.signum or 0), device=self.device)
        flag = all_reduce_max(flag, self.info)
        return int(flag.item()) or None

    def fit(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        point = self._resume_point()
        global_step, best = point["global_step"], point["best"]
        stream = MetricsStream(cfg.metrics_file or Path(cfg.save_path) / "metrics.jsonl") if info.is_main else MetricsStream(None)
        if point["name"] is not None:
            dropped = stream.drop_after(global_step)
            if dropped and info.is_main:
                logger.info("metrics: dropped %d records past step %d (training the checkpoint does not hold)", dropped, global_step)
        exp = ExperimentLogger(cfg.logger, cfg.log_dir, self.run_name, cfg.to_dict()) if info.is_main else ExperimentLogger(None, "", "", {})
        stream.write(
            "start",
            run_name=self.run_name,
            run_id=self.run_id,
            total_steps=self.total_steps,
            epochs=cfg.epochs,
            steps_per_epoch=self.steps_per_epoch[0],
            resumed_from=point["name"],
            resumed_step=global_step if point["name"] is not None else None,
        )
        if point["name"] is not None and info.is_main:
            logger.info("resuming from %s (step %d)", self.resume_dir, global_step)
        history: list[dict[str, Any]] = []
        stopped, signum = False, None
        if self._reached_max_steps(global_step):  # resumed a run that --max-steps already stopped there
            stopped = True
            if info.is_main:
                logger.info("the checkpoint holds step %d, --max-steps is %d: nothing to train", global_step, cfg.max_steps)
        last_epoch = point["epoch"] if stopped else cfg.epochs
        self.objective.train()
        with StopRequest() as stop:
            for epoch in range(point["epoch"], last_epoch):
                plan = plan_epoch(self._train_sampler, epoch, self.batches_per_step)
                resuming = epoch == point["epoch"]
                done = point["done"] if resuming else 0
                epoch_stats = torch.zeros(cfg.ttt_steps, len(STAT_FIELDS), device=self.device)
                if resuming and point["epoch_stats"] is not None:
                    epoch_stats = point["epoch_stats"].to(self.device)
                # The RNG state is restored where it was captured: an epoch end before the next
                # epoch's loader draws its seed, a mid-epoch step after it.
                if resuming and point["rng"] is not None and done == 0:
                    ckpt.restore_rng(point["rng"])
                batches = iter(self._epoch_loader(plan[done:]))
                if resuming and point["rng"] is not None and done > 0:
                    ckpt.restore_rng(point["rng"])
                t0 = time.perf_counter()
                for batch in batches:
                    stats, tokens = self.train_step(batch)
                    global_step += 1
                    done += 1
                    epoch_stats += stats
                    metrics = summarize(stats, cfg.ttt_step_loss_decay)
                    lr = self.scheduler.get_last_lr()[0]
                    metrics["lr"] = lr
                    metrics["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
                    history.append({"type": "train", "epoch": epoch, "step": global_step, "metrics": metrics})
                    if info.is_main:
                        stream.write("train", epoch=epoch, step=global_step, total_steps=self.total_steps, metrics=metrics)
                        exp.log("train", metrics, global_step)
                        if global_step % cfg.log_freq == 0:
                            logger.info("%s", metrics_line("train", metrics, epoch, lr))
                    signum = self._agreed_stop(stop)
                    at_max = self._reached_max_steps(global_step)
                    interval = cfg.checkpoint_every_steps > 0 and global_step % cfg.checkpoint_every_steps == 0
                    # A stop inside an epoch (signal, --max-steps) saves the step it reached, once,
                    # whatever else asked for it; the epoch end saves its own.
                    if done < len(plan) and (signum or at_max or interval):
                        reason = signal_name(signum) if signum else "max_steps" if at_max else "interval"
                        state = {"steps_done_in_epoch": done, "epoch_stats": epoch_stats.detach().cpu()}
                        path = self.save(ckpt.mid_epoch_name(epoch, global_step), epoch, global_step, best, False, state)
                        stream.write("step_checkpoint", epoch=epoch, step=global_step, path=str(path), reason=reason)
                    t0 = time.perf_counter()
                    if signum:
                        break
                    if at_max:
                        stopped = True
                        break
                if done < len(plan):
                    break  # stopped inside the epoch: no validation, no epoch checkpoint
                val = self.validate()
                train_epoch = summarize(epoch_stats, cfg.ttt_step_loss_decay)
                score = val["loss"] if val is not None else train_epoch["loss"]
                is_best = best["val_loss"] is None or score < best["val_loss"]
                if is_best:
                    best = {"val_loss": score, "epoch": epoch}
                if val is not None:
                    history.append({"type": "val", "epoch": epoch, "step": global_step, "metrics": val})
                    if info.is_main:
                        stream.write("val", epoch=epoch, step=global_step, metrics=val)
                        exp.log("val", val, global_step)
                        logger.info("%s", metrics_line("val", val, epoch))
                path = self.save(ckpt.epoch_end_name(epoch), epoch, global_step, best, is_best, {})
                stream.write("checkpoint", epoch=epoch, step=global_step, path=str(path), val_loss=score, is_best=is_best)
                signum = signum or self._agreed_stop(stop)
                if stopped or signum:
                    break
        if signum:
            stream.write("end", status="interrupted", signal=signal_name(signum))
            if info.is_main:
                logger.info("%s: checkpointed step %d and stopped", signal_name(signum), global_step)
        elif not stopped:
            stream.write("end", status="completed")
        elif info.is_main:
            logger.info("stopped after --max-steps %d; checkpointed step %d", cfg.max_steps, global_step)
        stream.close()
        exp.close()
        barrier(info)
        return {"history": history, "global_step": global_step, "best": best, "stopped": stopped or bool(signum),
                "signal": signum}

    def save(self, name: str, epoch: int, global_step: int, best: dict[str, Any], is_best: bool,
             extra_state: dict[str, Any]) -> Path:
        """Checkpoint `<save-path>/<name>`; `extra_state` marks (and restores) a mid-epoch one."""
        model_state = self._full_model_state()  # collective under FSDP
        optim_state = self._full_optimizer_state()  # collective under FSDP
        path = Path(self.cfg.save_path) / name
        if self.info.is_main:
            trainer_state = {
                "epoch": epoch,
                "global_step": global_step,
                "steps_done_in_epoch": None,
                "rng": ckpt.capture_rng(),
                "best_val_loss": best["val_loss"],
                "best_epoch": best["epoch"],
                "run_id": self.run_id,
                **extra_state,
            }
            path = ckpt.write_checkpoint(
                self.cfg.save_path, name, self.draft, model_state, optim_state,
                self.scheduler.state_dict(), trainer_state, is_best,
            )
            for old in ckpt.prune_checkpoints(self.cfg.save_path, self.cfg.keep_last_checkpoints):
                logger.info("--keep-last-checkpoints %d: deleted %s", self.cfg.keep_last_checkpoints, old)
        barrier(self.info)
        return path


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Build, train and tear down; returns the trainer's summary (history, best, steps)."""
    info = setup_distributed(cfg.device)
    trainer = None
    try:
        trainer = Trainer(cfg, info)
        trainer.build()
        return trainer.fit()
    finally:
        # An online store's prefetch requests must not outlive a failed run (they retry for minutes).
        close = getattr(getattr(trainer, "store", None), "close", None)
        if close is not None:
            close()
        cleanup(info)
