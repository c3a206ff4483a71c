"""The training state as `Stateful` objects (torch.distributed.checkpoint's protocol).

Each object turns one part of the state into a plain dict (`state_dict`) and back
(`load_state_dict`); the `Checkpointer` saves and restores them together as one map, so
a resume is "load the map, then run the same loop". `Progress` holds where training is (the
global step; the epoch and the position in it follow from the step and the per-epoch step
counts) and what it has seen (the best score, the epoch's summed stats); `RngState` the
random generators; `ModelState` and `OptimizerState` the draft's weights and AdamW's moments
as full (unsharded) tensors, which under FSDP2 is a collective every rank joins.

`Progress` and `RngState` write the keys `trainer_state.pt` has always held, so checkpoints
of earlier releases resume and earlier releases resume these.
"""

from __future__ import annotations

from typing import Any

import torch

from speculators.errors import UserError
from speculators.train import checkpoint as ckpt
from speculators.train.distributed import DistInfo
from speculators.train.step_data import StepData


class Progress:
    """Global step, best score (`checkpoint_best`) and the current epoch's summed step stats."""

    def __init__(self, data: StepData, stats_shape: tuple[int, int], device: torch.device):
        self.data = data
        self.stats_shape, self.device = stats_shape, device
        self.step = 0
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.epoch_stats = torch.zeros(stats_shape, device=device)

    def advance(self, stats: torch.Tensor) -> None:
        self.step += 1
        self.epoch_stats += stats

    def offer(self, score: float, epoch: int, higher_is_better: bool = False) -> bool:
        """Record an epoch end's score; True if it is the best so far (a tie keeps the earlier epoch)."""
        if self.best_score is not None and (score <= self.best_score if higher_is_better else score >= self.best_score):
            return False
        self.best_score, self.best_epoch = score, epoch
        return True

    def reset_epoch(self) -> None:
        self.epoch_stats = torch.zeros(self.stats_shape, device=self.device)

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self.data.locate(self.step)
        state = {"global_step": self.step, "best_val_loss": self.best_score, "best_epoch": self.best_epoch}
        if done == 0:  # an epoch end: the epoch it ends, nothing done in the next one
            return {**state, "epoch": epoch - 1, "steps_done_in_epoch": None}
        return {**state, "epoch": epoch, "steps_done_in_epoch": done, "epoch_stats": self.epoch_stats.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        step = int(state["global_step"])
        done = state.get("steps_done_in_epoch")
        if done is not None and self.data.locate(step) != (int(state["epoch"]), int(done)):
            epoch, now = self.data.locate(step)
            raise UserError(
                f"the checkpoint holds global step {step} as step {done} of epoch {state['epoch']}, but the data "
                f"and settings now put it at step {now} of epoch {epoch}; resume with the data and "
                "--batches-per-step it was trained with"
            )
        self.step = step
        self.best_score, self.best_epoch = state.get("best_val_loss"), state.get("best_epoch")
        stats = state.get("epoch_stats")
        self.epoch_stats = stats.to(self.device) if stats is not None else torch.zeros(self.stats_shape, device=self.device)


class RngState:
    """Python's, NumPy's and torch's (CPU and CUDA) generators."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": ckpt.capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ckpt.restore_rng(state["rng"])


class ModelState:
    """The draft's full state dict (the objective's `draft.` part; the verifier head is not trained)."""

    def __init__(self, objective: torch.nn.Module, info: DistInfo):
        self.objective, self.info = objective, info

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.objective,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = self.objective.state_dict()
        return {k[len("draft.") :]: v for k, v in state.items() if k.startswith("draft.")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.objective, {f"draft.{k}": v for k, v in state.items()},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.objective.draft.load_state_dict(state)


class OptimizerState:
    """AdamW's state as full tensors keyed by parameter name (the same on any world size)."""

    def __init__(self, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo):
        self.objective, self.optimizer, self.info = objective, optimizer, info

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.info.distributed)
        return get_optimizer_state_dict(self.objective, self.optimizer, options=opts)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.objective, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
