"""Helpers shared by the training tests (a plain module: test modules do not import each other)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from speculators.config.train import TrainConfig
from speculators.train.metrics_stream import read_metrics
from speculators.train.trainer import run_training


def make_cfg(verifier, data, save, **kw) -> TrainConfig:
    """A small CPU run: 2 epochs of 64-token rows, 2 TTT steps, a quarter held out.

    Acceptance is not measured (``eval_prompts=0``) unless a test asks for it: the probe decodes
    with the verifier at every epoch end, which is CI time spent on what tests/test_train_acceptance.py
    already covers.
    """
    base = dict(
        verifier_name_or_path=str(verifier), data_path=str(data), save_path=str(save), epochs=2, lr=2e-3,
        total_seq_len=64, ttt_steps=2, log_freq=1000, train_data_ratio=0.75, warmup_steps=1, eval_prompts=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def train_losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["metrics"]["loss"] for r in read_metrics(Path(save) / "metrics.jsonl") if r["type"] == "train"}


def train_losses_of(verifier, data, save, **kw) -> dict[int, float]:
    run_training(make_cfg(verifier, data, save, epochs=2, **kw))
    return train_losses(save)


def run_train_cli(args: list[str], nproc: int = 1, timeout: float = 400) -> subprocess.CompletedProcess:
    """`python -m speculators.train ARGS` with OMP_NUM_THREADS=1: one process, or `nproc` under
    `torchrun --standalone` (FSDP2 over gloo on the CPU).

    Acceptance is not measured (``--eval-prompts 0`` is added) unless ARGS name ``--eval-prompts``,
    for the reason given in ``make_cfg``.

    A torchrun launch is retried once (a shared CI box can lose the rendezvous port race); a
    --save-path the failed attempt created is removed first, so the retry starts as the first did.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not any(a == "--eval-prompts" or a.startswith("--eval-prompts=") for a in args):
        args = [*args, "--eval-prompts", "0"]
    if nproc == 1:
        return subprocess.run([sys.executable, "-m", "speculators.train", *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    save = Path(args[args.index("--save-path") + 1])
    fresh = not save.exists()
    for attempt in range(2):
        run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "speculators.train",
                              *args], env=env, capture_output=True, text=True, timeout=timeout)
        if run.returncode == 0:
            return run
        print(f"torchrun attempt {attempt} failed (rc {run.returncode}):\n{run.stderr[-3000:]}")
        if fresh:
            shutil.rmtree(save, ignore_errors=True)
    return run
