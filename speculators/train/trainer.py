"""The training loop: TTT-train the draft, validate at epoch ends, checkpoint, report.

`build_components` (speculators.train.components) builds the run's parts; the `Trainer`
receives them and runs one loop driven by the global optimizer step alone (the epoch and the
position in it follow from the step, speculators.train.step_data):

    while step < last step and no stop signal:
        train_step (every --eval-every-steps: acceptance); at an epoch's last step end_epoch
        (validate, acceptance, checkpoint); maybe_save

The steady state never waits on the accelerator: a step's stats stay on the device until
every `--sync-every-steps` steps (and before anything that reads them: an epoch end, an
acceptance measurement, a checkpoint, the end), when they come to the host in one copy and
their train records go out; the stop signal is agreed across ranks at those steps only
(`SyncPolicy`). The records and losses are the same for any N.

A resume is no case of the loop: the `Trainer` starts by loading the checkpoint's state map
(speculators.train.state: step, best score, epoch stats, RNG, model, optimizer, scheduler)
through the one `Checkpointer`, then `fit` runs the same loop from that step. Every record
goes out through the one `MetricsSink` (metrics.jsonl, trackers, console).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch

from speculators.metric_records import (
    AcceptanceRecord,
    CheckpointRecord,
    EndRecord,
    StartRecord,
    StepCheckpointRecord,
    TrainRecord,
    ValRecord,
)
from speculators.train import checkpoint as ckpt
from speculators.train.acceptance import Acceptance
from speculators.train.components import Components, build_components
from speculators.config.train import TrainConfig
from speculators.train.distributed import all_reduce_max, all_reduce_sum, barrier, cleanup, setup_distributed
from speculators.train.interrupt import StopRequest, signal_name
from speculators.train.losses import STAT_FIELDS, summarize
from speculators.train.objective import step_token_counts
from speculators.train.state import ModelState, OptimizerState, Progress, RngState
from speculators.train.step_data import count_tokens, to_device


def sync_every(requested: int | None, device: torch.device) -> int:
    """Steps between host syncs: unset = 1 on the CPU (a sync costs nothing there), 16 on CUDA
    (an `.item()` per step stalled the H200 between steps: bench/results/train_gpu_2048.json)."""
    if requested is not None:
        return requested
    return 16 if device.type == "cuda" else 1


@dataclass
class _Pending:
    """Train records whose stats are still on the device (one window between host syncs)."""

    steps: list[tuple[int, float]] = field(default_factory=list)  # (global step, lr)
    stats: list[torch.Tensor] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class FitResult:
    """How a `fit` ended: `stopped` before the last epoch's end (--max-steps or `signal`)."""

    global_step: int
    best_score: float | None
    best_epoch: int | None
    stopped: bool
    signal: int | None


class Trainer:
    def __init__(self, components: Components):
        c = self.components = components
        self.cfg, self.info, self.device = c.cfg, c.info, c.info.device
        self.draft, self.objective, self.params = c.draft, c.objective, c.params
        self.optimizer, self.scheduler, self.data, self.sink = c.optimizer, c.scheduler, c.data, c.sink
        self.autocast, self.acceptance = c.autocast, c.acceptance
        self.data_dtype = torch.bfloat16 if c.autocast else torch.float32
        self.progress = Progress(self.data, (self.cfg.ttt_steps, len(STAT_FIELDS)), self.device)
        self.model_state = ModelState(self.objective, self.info)
        self.checkpointer = ckpt.Checkpointer(
            self.cfg.save_path,
            {"model": self.model_state,
             "optimizer": OptimizerState(self.objective, self.optimizer, self.info),
             "scheduler": self.scheduler, "progress": self.progress, "rng": RngState()},
            self.draft, c.run_id, self.cfg.keep_last_checkpoints, self.info,
        )
        if c.resume_dir is not None:
            self.checkpointer.load(c.resume_dir)
        self.sync_every = sync_every(self.cfg.sync_every_steps, self.device)
        self._pending = _Pending()
        max_steps = self.cfg.max_steps if self.cfg.max_steps is not None else self.data.total_steps
        self.last_step = min(self.data.total_steps, max_steps)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> FitResult:
        self.announce()
        batches = self.data.batches(self.progress.step)
        signum = None
        self.objective.train()
        self._clock = time.perf_counter()
        with StopRequest() as stop:
            try:
                while self.progress.step < self.last_step and not signum:
                    self.run_step(next(batches))
                    if self.data.is_epoch_end(self.progress.step):
                        self.end_epoch()
                    signum = self._agreed_stop(stop)
                    self.maybe_save(signum)
                    if not self._pending:  # the next window starts here
                        self._clock = time.perf_counter()
            except BaseException:
                self._flush_quietly()  # the steps done before a crash keep their records
                raise
        self.flush_records()
        return self.finish(signum)

    def announce(self) -> None:
        """The start record and console lines: where this run starts."""
        resumed = self.components.resume_dir
        step = self.progress.step
        self.sink.start(StartRecord(
            run_name=self.components.run_name, run_id=self.components.run_id, total_steps=self.data.total_steps,
            epochs=self.cfg.epochs, steps_per_epoch=self.data.steps_per_epoch[0],
            resumed_from=resumed.name if resumed else None, resumed_step=step if resumed else None,
        ))
        if resumed:
            self.sink.note("resuming from %s (step %d)", resumed, step)
        if self._reached_max_steps():
            self.sink.note("the checkpoint holds step %d, --max-steps is %d: nothing to train", step, self.cfg.max_steps)

    def run_step(self, batch: dict[str, torch.Tensor]) -> None:
        """One optimizer step; its train record goes out at the next host sync."""
        stats, tokens = self.train_step(batch)
        self.progress.advance(stats)
        step = self.progress.step
        self._pending.steps.append((step, self.scheduler.get_last_lr()[0]))
        self._pending.stats.append(stats)
        self._pending.tokens.append(tokens)
        if step % self.sync_every == 0:
            self.flush_records()
        every = self.cfg.eval_every_steps
        if every and step % every == 0 and not self.data.is_epoch_end(step):  # end_epoch measures its own
            self.measure_acceptance()

    def flush_records(self) -> None:
        """Bring the pending steps' stats to the host in one copy and emit their train records.

        `tokens_per_s` is the window's tokens over its wall time (data loading included): with
        one step per window, that step's own rate.
        """
        pending, self._pending = self._pending, _Pending()
        if not pending:
            return
        n = len(pending)
        flat = torch.cat([torch.stack(pending.stats).flatten(),
                          torch.stack([t.to(self.device) for t in pending.tokens]).float()])
        host = flat.cpu()  # the one device sync of the window
        stats, tokens = host[: -n].view(n, *pending.stats[0].shape), host[-n:]
        rate = float(tokens.sum()) / max(time.perf_counter() - self._clock, 1e-9)
        for (step, lr), s, tok in zip(pending.steps, stats, tokens.tolist()):
            metrics = summarize(s, self.cfg.ttt_step_loss_decay)
            metrics["lr"] = lr
            metrics["tokens_per_s"] = rate
            metrics["tokens"] = tok  # this step's trained tokens (all ranks): the dashboard's tokens axis
            self.sink.emit(TrainRecord(epoch=self.data.epoch_of(step), step=step, total_steps=self.data.total_steps,
                                       metrics=metrics))
        self._clock = time.perf_counter()

    def _flush_quietly(self) -> None:
        try:
            self.flush_records()
        except Exception:  # noqa: BLE001 - the original error is the one to raise
            pass

    def end_epoch(self) -> None:
        """Validate, measure acceptance, score the epoch by --best-by (validation loss, else its
        training loss; or mean acceptance length) and checkpoint it."""
        self.flush_records()
        step = self.progress.step
        epoch = self.data.epoch_of(step)
        val = self.validate()
        loss = val["loss"] if val is not None else summarize(self.progress.epoch_stats, self.cfg.ttt_step_loss_decay)["loss"]
        if val is not None:
            self.sink.emit(ValRecord(epoch=epoch, step=step, metrics=val))
        acceptance = self.measure_acceptance()
        by_acceptance = self.cfg.best_by == "acceptance"
        score = acceptance.mean_acceptance_length if by_acceptance and acceptance else loss
        is_best = self.progress.offer(score, epoch, higher_is_better=by_acceptance)
        self.progress.reset_epoch()
        path = self.checkpointer.save(ckpt.epoch_end_name(epoch), is_best)
        self.sink.emit(CheckpointRecord(epoch=epoch, step=step, path=str(path), val_loss=loss, is_best=is_best,
                                        best_by=self.cfg.best_by, score=score))

    def measure_acceptance(self) -> Acceptance | None:
        """Speculative decoding of the current draft on the run's held-out prompts (None: no prompts).
        Every rank takes part (gathering the full weights is a collective under FSDP); rank 0 decodes."""
        if self.acceptance is None:
            return None
        self.flush_records()
        result = self.acceptance.measure(self.model_state.state_dict())
        step = self.progress.step
        self.sink.emit(AcceptanceRecord(epoch=self.data.epoch_of(step), step=step, **asdict(result)))
        return result

    def maybe_save(self, signum: int | None) -> None:
        """Checkpoint inside an epoch on a stop (signal, --max-steps) or --checkpoint-every-steps, once."""
        step = self.progress.step
        if self.data.is_epoch_end(step):
            return  # end_epoch saved this step
        every = self.cfg.checkpoint_every_steps
        reason = (signal_name(signum) if signum else "max_steps" if self._reached_max_steps()
                  else "interval" if every and step % every == 0 else None)
        if reason is None:
            return
        self.flush_records()
        epoch = self.data.epoch_of(step)
        path = self.checkpointer.save(ckpt.mid_epoch_name(epoch, step), is_best=False)
        self.sink.emit(StepCheckpointRecord(epoch=epoch, step=step, path=str(path), reason=reason))

    def finish(self, signum: int | None) -> FitResult:
        """The end record (a --max-steps stop writes none: the run is not over) and the result."""
        step = self.progress.step
        if signum:
            self.sink.emit(EndRecord(status="interrupted", signal=signal_name(signum)))
            self.sink.note("%s: checkpointed step %d and stopped", signal_name(signum), step)
        elif self._reached_max_steps():
            self.sink.note("stopped after --max-steps %d; checkpointed step %d", self.cfg.max_steps, step)
        else:
            self.sink.emit(EndRecord(status="completed"))
        self.sink.close()
        barrier(self.info)
        return FitResult(global_step=step, best_score=self.progress.best_score, best_epoch=self.progress.best_epoch,
                         stopped=bool(signum) or self._reached_max_steps(), signal=signum)

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.progress.step >= self.cfg.max_steps

    def _agreed_stop(self, stop: StopRequest) -> int | None:
        """The stop signal if any rank got one (all ranks must stop at the same step).

        One process: the signal itself, no device op. Several: a collective, so only at the
        steps every rank syncs at (`--sync-every-steps`) and at epoch ends; a signal between
        them stops the run at the next such step.
        """
        if not self.info.distributed:
            return stop.signum or None
        step = self.progress.step
        if step % self.sync_every and not self.data.is_epoch_end(step) and step < self.last_step:
            return None
        flag = torch.tensor(float(stop.signum or 0), device=self.device)
        flag = all_reduce_max(flag, self.info)
        return int(flag.item()) or None

    # ---------------------------------------------------------------- the math of a step
    def _forward(self, batch, denominators):
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            return self.objective(batch, self.cfg.ttt_steps, self.cfg.ttt_step_loss_decay, denominators)

    def _denominators(self, batch) -> torch.Tensor:
        counts = step_token_counts(batch["loss_mask"], batch["document_ids"], self.cfg.ttt_steps)
        counts = all_reduce_sum(counts, self.info)
        return counts / self.info.world_size

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Forward, backward, clip, AdamW and LR step; returns the step's stats summed over ranks and
        its tokens (a 0-d tensor), both left where they are (no host sync)."""
        tokens = count_tokens(batch)  # on the host batch, before the copy: no device sync
        batch = to_device(batch, self.device, self.data_dtype)
        denominators = self._denominators(batch)
        loss, stats = self._forward(batch, denominators)
        loss.backward()
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = all_reduce_sum(stats.detach().float(), self.info)
        if self.info.distributed:
            tokens = all_reduce_sum(tokens.to(self.device, non_blocking=True), self.info)
        return stats, tokens

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        if not self.data.val_batches:
            return None
        self.objective.eval()
        total = torch.zeros(self.cfg.ttt_steps, len(STAT_FIELDS), device=self.device)
        tokens = torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        for batch, counted in self.data.val_steps():
            batch = to_device(batch, self.device, self.data_dtype)
            _, stats = self._forward(batch, self._denominators(batch))
            if counted:
                total += stats.float()
                tokens += (batch["document_ids"] != -1).sum()
        total = all_reduce_sum(total, self.info)
        tokens = all_reduce_sum(tokens, self.info)
        self.objective.train()
        metrics = summarize(total, self.cfg.ttt_step_loss_decay)
        metrics["tokens_per_s"] = float(tokens) / max(time.perf_counter() - t0, 1e-9)
        return metrics


def run_training(cfg: TrainConfig) -> FitResult:
    """Build, train and tear down (the store and trackers are closed however the run ends)."""
    info = setup_distributed(cfg.device)
    components = None
    try:
        components = build_components(cfg, info)
        return Trainer(components).fit()
    finally:
        if components is not None:
            components.close()
        cleanup(info)
