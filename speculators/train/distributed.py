"""Process-group setup and FSDP2 sharding.

Under `torchrun` (WORLD_SIZE > 1) we join a process group: NCCL when CUDA is available,
gloo on CPU.  The draft's decoder layers and then the whole objective are wrapped with
FSDP2 `fully_shard` (with a bf16 `MixedPrecisionPolicy` under bf16 training); gradients
are averaged across ranks by FSDP.  Rank 0 alone writes
checkpoints and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from speculators.config.device import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    device = resolve_device(device)
    use_cuda = device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)


def mixed_precision_policy(bf16: bool):
    """FSDP2's policy under bf16 training: parameters all-gathered and computed in bf16,
    gradients reduce-scattered in fp32 (sharded master weights and the optimizer stay fp32).

    Forward inputs are not cast: the loss denominators are float counts that bf16 would
    round, and autocast already runs the matmuls in bf16.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard(objective: torch.nn.Module, info: DistInfo, bf16: bool = False) -> torch.nn.Module:
    """Apply FSDP2 (per decoder layer, then the root) when running distributed."""
    if not info.distributed:
        return objective
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(bf16)
    for layer in objective.draft.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return objective


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def on_main_rank(fn, info: DistInfo):
    """Run `fn` on rank 0 alone and give its result to every rank.

    If `fn` raises on rank 0, every rank raises too (rank 0 its own exception, the others a
    message naming it) instead of the others waiting forever on the broadcast or the next
    collective. A `UserError` stays a `UserError` on every rank, so the launcher prints it as one.
    """
    from speculators.errors import UserError

    if not info.distributed:
        return fn()
    box: list = [None]
    failure: BaseException | None = None
    if info.is_main:
        try:
            box = [("ok", fn())]
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
            failure = exc
            box = [("error", (isinstance(exc, UserError), f"{type(exc).__name__}: {exc}"))]
    dist.broadcast_object_list(box, src=0)
    status, payload = box[0]
    if status == "ok":
        return payload
    if failure is not None:
        raise failure
    user_error, message = payload
    raise (UserError if user_error else RuntimeError)(f"rank 0 failed: {message}")


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
