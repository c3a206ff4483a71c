"""A stand-in trainer for the multi-node stage tests: one process per node under a real
torchrun c10d rendezvous, in one gloo process group, all-reducing until it is stopped, so
what a test stops or kills is a trainer inside a live collective. Once in the group it writes
`<out>/trainer.<rank>.pid` holding its pid and its torchrun agent's pid.

    python tests/support/gloo_loop.py OUT_DIR        (under torchrun)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def torchrun_argv(rendezvous, out_dir: Path) -> list[str]:
    """One node's torchrun (the service's rendezvous arguments) running this loop."""
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous.torchrun_args(), "--nproc_per_node", "1",
            str(Path(__file__).resolve()), str(out_dir)]


def main(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    x = torch.ones(1)
    dist.all_reduce(x)  # every node is in
    pid_file = Path(out_dir) / f"trainer.{dist.get_rank()}.pid"
    pid_file.with_suffix(".tmp").write_text(f"{os.getpid()} {os.getppid()}")
    pid_file.with_suffix(".tmp").rename(pid_file)
    while True:
        dist.all_reduce(x)
        time.sleep(0.2)


if __name__ == "__main__":
    main(sys.argv[1])
