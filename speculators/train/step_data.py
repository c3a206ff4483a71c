"""The training data as a function of the global optimizer step.

Each epoch the packed batch sampler (speculators.data) is run once over the whole training
split with the epoch's seed; consecutive groups of `batches_per_step` batches form one
optimizer step (the tail is dropped) and rank `r` takes batches `r, r + W, ...` of the group.
Because the loss is normalised by the global count of counted positions, a step's update does
not depend on the world size: `torchrun --nproc_per_node 2` matches one process with
`batches_per_step=2` up to float rounding.

The per-epoch step counts fix where any global step falls (`locate`), so the loop needs only
the step: `batches(step)` yields the batches from that step on, whether the run starts fresh
or resumes inside an epoch.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Callable, Iterator

import torch

from speculators.data.hs_quant import PAYLOAD_SCALE_SUFFIX, dequantise_groups, payload_scale_key
from speculators.data.sample_store import SampleStore
from speculators.errors import UserError
from speculators.train.distributed import DistInfo

Plan = list[list[list[int]]]  # steps -> the step's batches -> sample indices


def plan_epoch(sampler_factory: Callable[[], Any], epoch: int, batches_per_step: int) -> Plan:
    """Global steps of one epoch: each a list of `batches_per_step` index lists (tail dropped)."""
    sampler = sampler_factory()
    sampler.set_epoch(epoch)
    batches = list(sampler)
    n = len(batches) // batches_per_step
    return [batches[i * batches_per_step : (i + 1) * batches_per_step] for i in range(n)]


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


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's real (non-padding) tokens as a 0-d float tensor, counted where the batch is."""
    return (batch["document_ids"] != -1).sum().float()


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move a collated batch to the device, its floating tensors in the training dtype.

    fp8 hidden states (uint8 bits plus ``*_scale``, `speculators.data.dataset.Eagle3Collator`) are
    copied as they are (pinned by the DataLoader on CUDA, so the copy is asynchronous) and
    dequantised here, on the device, in one pass over the batch (`hs_quant.dequantise_groups`):
    the values equal the host's `hs_quant.dequantise_rows` bit for bit, then cast to ``dtype``."""
    scales = {k for k in batch if k.endswith(PAYLOAD_SCALE_SUFFIX) and k[: -len(PAYLOAD_SCALE_SUFFIX)] in batch}
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out = {}
    for k, v in moved.items():
        if k in scales:
            continue
        if payload_scale_key(k) in scales:
            v = dequantise_groups(v, moved[payload_scale_key(k)])
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


class _StepBatches(torch.utils.data.Dataset):
    """Item `s` = this rank's collated batch of global step `s` (lets DataLoader workers prefetch).

    With `positions_for` TTT steps the batch also carries the objective's gather indices
    (`speculators.train.objective.counted_positions`), computed here on the host so the
    device step never waits on a `nonzero`.
    """

    def __init__(self, ds, steps: Plan, collate, rank: int, world: int, positions_for: int = 0):
        self.ds, self.steps, self.collate, self.rank, self.world = ds, steps, collate, rank, world
        self.positions_for = positions_for

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, s: int) -> dict[str, torch.Tensor]:
        mine = self.steps[s][self.rank :: self.world]
        batch = self.collate([self.ds[i] for idx in mine for i in idx])
        if self.positions_for:
            from speculators.train.objective import counted_positions

            batch.update(counted_positions(batch["loss_mask"], batch["document_ids"], self.positions_for))
        return batch


@dataclass
class StepData:
    """Train and validation batches of one run, addressed by global step."""

    train_ds: Any
    val_ds: Any
    collate: Callable
    train_sampler: Callable[[], Any]
    val_batches: list[list[int]]
    batches_per_step: int
    steps_per_epoch: list[int]
    info: DistInfo
    seed: int
    num_workers: int | None
    store: SampleStore
    positions_for: int = 0  # TTT steps whose gather indices the loader precomputes (0: the objective does)

    @classmethod
    def build(cls, store, cfg, info: DistInfo, batches_per_step: int, dtype: torch.dtype) -> StepData:
        from speculators.data.dataset import Eagle3Collator, Eagle3Dataset, PackedBatchSampler, split_indices

        train_idx, val_idx = split_indices(len(store), 1.0 - cfg.train_data_ratio, cfg.seed)
        train_ds = Eagle3Dataset(store, max_len=cfg.total_seq_len, indices=train_idx, dtype=dtype)
        val_ds = Eagle3Dataset(store, max_len=cfg.total_seq_len, indices=val_idx, dtype=dtype) if val_idx else None
        train_lengths = train_ds.lengths()

        def train_sampler():
            return PackedBatchSampler(train_lengths, cfg.total_seq_len, rows=cfg.rows_per_batch, shuffle=True,
                                      seed=cfg.seed)

        steps_per_epoch = [len(plan_epoch(train_sampler, e, batches_per_step)) for e in range(cfg.epochs)]
        if steps_per_epoch[0] == 0:
            raise UserError(
                f"the training split packs into fewer than {batches_per_step} batches; add data, lower "
                "--batches-per-step or run fewer processes"
            )
        val_batches = []
        if val_ds is not None:
            val_batches = list(PackedBatchSampler(val_ds.lengths(), cfg.total_seq_len, rows=cfg.rows_per_batch,
                                                  shuffle=False))
        return cls(train_ds=train_ds, val_ds=val_ds, collate=Eagle3Collator(cfg.total_seq_len, pack=True),
                   train_sampler=train_sampler, val_batches=val_batches, batches_per_step=batches_per_step,
                   steps_per_epoch=steps_per_epoch, info=info, seed=cfg.seed, num_workers=cfg.num_workers,
                   store=store, positions_for=cfg.ttt_steps if cfg.algorithm == "eagle3" else 0)  # TTTObjective's

    # ---------------------------------------------------------------- where a step falls
    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_epoch)

    @property
    def epoch_ends(self) -> list[int]:
        """The global step that completes each epoch."""
        return list(accumulate(self.steps_per_epoch))

    def locate(self, step: int) -> tuple[int, int]:
        """`(epoch, steps done in it)` after `step` global steps; an epoch's end is `(epoch + 1, 0)`."""
        ends = self.epoch_ends
        epoch = bisect.bisect_right(ends, step)
        return epoch, step - (ends[epoch - 1] if epoch else 0)

    def epoch_of(self, step: int) -> int:
        """The epoch that global step `step` (counted from 1) trains in."""
        return self.locate(step - 1)[0]

    def is_epoch_end(self, step: int) -> bool:
        return step > 0 and self.locate(step)[1] == 0

    # ---------------------------------------------------------------- batches
    def plan(self, epoch: int) -> Plan:
        return plan_epoch(self.train_sampler, epoch, self.batches_per_step)

    def epoch_loader(self, plan: Plan, epoch: int) -> torch.utils.data.DataLoader:
        """This rank's collated batches of `plan`, loaded ahead by the DataLoader's workers.

        The loader's own generator (seeded by the epoch) draws its base seed, so starting an epoch
        leaves the global RNG alone and a resume restores it once, wherever in an epoch it falls.
        """
        w, r = self.info.world_size, self.info.rank
        # A store that fetches ahead (online) gets this rank's samples in training order.
        self.store.prefetch([self.train_ds.indices[i] for step in plan for idx in step[r::w] for i in idx])
        return torch.utils.data.DataLoader(
            _StepBatches(self.train_ds, plan, self.collate, r, w, self.positions_for), batch_size=None, shuffle=False,
            num_workers=loader_workers(self.num_workers, self.info.device, online=self.store.fetches_ahead),
            pin_memory=self.info.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )

    def batches(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of global steps `step + 1, step + 2, ...` to the last epoch's end."""
        epoch, done = self.locate(step)
        for e in range(epoch, len(self.steps_per_epoch)):
            yield from self.epoch_loader(self.plan(e)[done if e == epoch else 0 :], e)

    def val_steps(self) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """This rank's validation batches, each with whether it counts.

        Every rank runs the same number of forwards (FSDP collectives): a rank with no batch
        left repeats the first one, not counted.
        """
        w, r = self.info.world_size, self.info.rank
        for s in range(math.ceil(len(self.val_batches) / w)):
            j = s * w + r
            real = j < len(self.val_batches)
            index = self.val_batches[j if real else 0]
            yield self.collate([self.val_ds[i] for i in index]), real
