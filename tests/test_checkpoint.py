"""Checkpoints: vLLM layout, best/latest links, bit-for-bit resume, run guard, killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speculators.errors import UserError
from speculators.train import checkpoint as ckpt
from speculators.train.metrics_stream import read_metrics
from speculators.train.trainer import run_training

from tests.support.interrupt import Killed
from tests.support.synthetic import write_synthetic_hidden_states
from tests.support.train_helpers import make_cfg, train_losses
from tests.support.vllm_loadable import assert_vllm_loadable


def test_checkpoint_layout_links_and_vllm_keys(tiny_llama, hs_data, tmp_path):
    save = tmp_path / "run"
    run_training(make_cfg(tiny_llama, hs_data, save, epochs=3, num_layers=2))
    for epoch in range(3):
        for name in ckpt.CHECKPOINT_FILES:
            assert (save / str(epoch) / name).is_file()
    cfg = json.loads((save / "0" / "config.json").read_text())
    (report,) = assert_vllm_loadable([save / "2"], tiny_llama)  # vLLM's own reader and loader
    assert report["num_hidden_layers"] == 2
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == str(Path(tiny_llama).resolve())
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 2
    records = read_metrics(save / "metrics.jsonl")
    ck = [r for r in records if r["type"] == "checkpoint"]
    best_epoch = min(ck, key=lambda r: r["val_loss"])["epoch"]
    assert os.readlink(save / ckpt.BEST_LINK) == str(best_epoch)
    assert os.readlink(save / ckpt.LATEST_LINK) == "2"
    # embed_tokens is the verifier's, frozen through training
    from speculators.verifier import load_verifier_weights, read_verifier_config

    w = load_verifier_weights(str(tiny_llama), read_verifier_config(str(tiny_llama)))
    assert torch.equal(load_file(str(save / "2" / "model.safetensors"))["embed_tokens.weight"], w["embed"])


def test_resume_continues_bit_for_bit(tiny_llama, hs_data, straight_run, tmp_path):
    straight, split = straight_run, tmp_path / "split"
    per_epoch = len([s for s in train_losses(straight)]) // 2
    first = run_training(make_cfg(tiny_llama, hs_data, split, max_steps=per_epoch))
    assert first.stopped and (split / "0").is_dir() and not (split / "1").exists()
    second = run_training(make_cfg(tiny_llama, hs_data, split))
    assert not second.stopped
    a = load_file(str(straight / "1" / "model.safetensors"))
    b = load_file(str(split / "1" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert train_losses(straight) == train_losses(split)
    opt_a = torch.load(straight / "1" / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    opt_b = torch.load(split / "1" / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]), k
    starts = [r for r in read_metrics(split / "metrics.jsonl") if r["type"] == "start"]
    assert [s["resumed_from"] for s in starts] == [None, "0"]


def test_save_path_guard(tiny_llama, hs_data, tmp_path):
    save = tmp_path / "run"
    run_training(make_cfg(tiny_llama, hs_data, save, epochs=1))
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_training(make_cfg(tiny_llama, hs_data, save, epochs=1, resume=False))
    with pytest.raises(UserError, match="another run.*num_layers"):
        run_training(make_cfg(tiny_llama, hs_data, save, epochs=2, num_layers=2))
    foreign = tmp_path / "foreign"
    (foreign / "3").mkdir(parents=True)
    with pytest.raises(UserError, match="no run.json"):
        run_training(make_cfg(tiny_llama, hs_data, foreign, epochs=1))


def test_half_written_epoch_dir_is_ignored(tmp_path):
    (tmp_path / "0").mkdir()
    for name in ckpt.CHECKPOINT_FILES:
        (tmp_path / "0" / name).write_text("x")
    (tmp_path / "1").mkdir()  # killed while writing: incomplete
    (tmp_path / ".tmp-2-abc").mkdir()
    assert [p.name for p in ckpt.epoch_dirs(tmp_path)] == ["0"]


def test_rng_roundtrip():
    import random

    import numpy as np

    state = ckpt.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


@pytest.mark.slow
def test_killed_run_resumes(tiny_llama, hs_data, tmp_path):
    save = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "speculators", "train", "--verifier-name-or-path", str(tiny_llama),
        "--data-path", str(hs_data), "--save-path", str(save), "--epochs", "40", "--lr", "1e-3",
        "--total-seq-len", "64", "--ttt-steps", "2", "--log-freq", "1000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not ckpt.epoch_dirs(save) and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.epoch_dirs(save), "no checkpoint before the deadline"
        proc.kill()
    finally:
        proc.wait()
    done = ckpt.latest_checkpoint(save)
    assert done is not None and int(done.name) < 39
    cmd[cmd.index("40")] = str(int(done.name) + 3)  # finish quickly: two more epochs
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    records = read_metrics(save / "metrics.jsonl")
    assert records[-1]["type"] == "end"
    starts = [r for r in records if r["type"] == "start"]
    assert starts[-1]["resumed_from"] == done.name
    assert ckpt.latest_checkpoint(save).name == str(int(done.name) + 2)


def unique_step_records(save: Path) -> None:
    seen = [(r["type"], r["step"]) for r in read_metrics(save / "metrics.jsonl") if "step" in r]
    dupes = sorted({k for k in seen if seen.count(k) > 1})
    assert not dupes, f"records repeated for (type, step): {dupes}"


def assert_same_training(a: Path, b: Path, final: str) -> None:
    wa, wb = load_file(str(a / final / "model.safetensors")), load_file(str(b / final / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = torch.load(a / final / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    ob = torch.load(b / final / ckpt.OPTIMIZER_FILE, weights_only=True)["state"]
    for k in oa:
        assert torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"]) and torch.equal(oa[k]["exp_avg_sq"], ob[k]["exp_avg_sq"]), k
    assert train_losses(a) == train_losses(b)


@pytest.fixture(scope="module")
def straight_run(tiny_llama, hs_data, tmp_path_factory):
    """Two epochs (make_cfg's defaults) trained straight through, never stopped: the reference of the resume tests."""
    save = tmp_path_factory.mktemp("straight") / "run"
    run_training(make_cfg(tiny_llama, hs_data, save))
    return save


def kill_in_step(monkeypatch, step: int) -> None:
    """Make the trainer die inside optimizer step `step` (before its update), like a process killed then."""
    from speculators.train.trainer import Trainer

    calls = iter(range(1, 1 << 30))
    real = Trainer.train_step

    def train_step(self, batch):
        if next(calls) == step:
            raise Killed(f"killed in step {step}")
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_step_checkpoints_resume_mid_epoch_bit_for_bit(tiny_llama, hs_data, straight_run, tmp_path, monkeypatch):
    straight, split = straight_run, tmp_path / "split"
    per_epoch = len(train_losses(straight)) // 2
    assert per_epoch >= 4, "the test needs epochs of several steps"
    # A kill between checkpoints: step 3 is logged, the newest checkpoint holds step 2.
    kill_in_step(monkeypatch, 4)
    with pytest.raises(Killed):
        run_training(make_cfg(tiny_llama, hs_data, split, checkpoint_every_steps=2))
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(split).name == "0-step2"
    assert max(train_losses(split)) == 3
    run_training(make_cfg(tiny_llama, hs_data, split, checkpoint_every_steps=2, keep_last_checkpoints=2))
    assert_same_training(straight, split, "1")
    unique_step_records(split)
    records = read_metrics(split / "metrics.jsonl")
    assert [r["resumed_from"] for r in records if r["type"] == "start"] == [None, "0-step2"]
    step_ckpts = [r["step"] for r in records if r["type"] == "step_checkpoint"]
    assert step_ckpts == [s for s in range(2, 2 * per_epoch, 2) if s != per_epoch]  # none on an epoch's last step
    # keep-last 2: the newest two remain, and the best epoch end is never deleted
    best = os.readlink(split / ckpt.BEST_LINK)
    names = [p.name for p in ckpt.checkpoint_dirs(split)]
    assert names[-1] == "1" and best in names and len(set(names) - {best}) <= 2
    assert os.readlink(split / ckpt.LATEST_LINK) == "1"


# trainer_state.pt of an epoch end as the releases before the Stateful trainer wrote it (a
# mid-epoch one adds epoch_stats); the resume of such checkpoints was checked against that code.
OLD_TRAINER_KEYS = {"epoch", "global_step", "steps_done_in_epoch", "rng", "best_val_loss", "best_epoch", "run_id"}


def test_max_steps_inside_an_epoch_checkpoints_that_step(tiny_llama, hs_data, straight_run, tmp_path):
    """--max-steps N inside an epoch saves step N (once, also when an interval save falls on it), and the
    run continued from there ends where the straight run does, bit for bit."""
    straight, split = straight_run, tmp_path / "split"
    per_epoch = len(train_losses(straight)) // 2
    assert per_epoch >= 4, "the test needs epochs of several steps"
    kw = dict(checkpoint_every_steps=2, keep_last_checkpoints=1)
    first = run_training(make_cfg(tiny_llama, hs_data, split, max_steps=3, **kw))
    assert first.stopped and first.signal is None and first.global_step == 3
    assert [p.name for p in ckpt.checkpoint_dirs(split)] == ["0-step3"]  # keep-last 1 removed 0-step2
    assert os.readlink(split / ckpt.LATEST_LINK) == "0-step3"
    assert not os.path.lexists(split / ckpt.BEST_LINK)  # mid-epoch checkpoints are never validated, so never best
    mid = torch.load(split / "0-step3" / ckpt.TRAINER_FILE, weights_only=True)
    assert set(mid) == OLD_TRAINER_KEYS | {"epoch_stats"}  # the layout earlier releases resume
    assert (mid["epoch"], mid["global_step"], mid["steps_done_in_epoch"]) == (0, 3, 3)
    assert max(train_losses(split)) == 3
    # The same command again: the checkpoint already holds step 3, so nothing is trained or saved.
    again = run_training(make_cfg(tiny_llama, hs_data, split, max_steps=3, **kw))
    assert again.stopped and again.global_step == 3
    records = read_metrics(split / "metrics.jsonl")
    last_start = max(i for i, r in enumerate(records) if r["type"] == "start")
    assert [r["type"] for r in records[last_start:]] == ["start"]  # nothing trained, saved or ended
    assert [p.name for p in ckpt.checkpoint_dirs(split)] == ["0-step3"] and max(train_losses(split)) == 3
    # Past the first epoch's end, stopping on a step the interval saves too (one save, not two).
    stop = per_epoch + 1 + (per_epoch + 1) % 2
    run_training(make_cfg(tiny_llama, hs_data, split, max_steps=stop, **kw))
    assert [p.name for p in ckpt.checkpoint_dirs(split)] == ["0", f"1-step{stop}"]  # the best epoch end stays
    assert os.readlink(split / ckpt.BEST_LINK) == "0" and os.readlink(split / ckpt.LATEST_LINK) == f"1-step{stop}"
    run_training(make_cfg(tiny_llama, hs_data, split))
    assert_same_training(straight, split, "1")
    unique_step_records(split)
    end = torch.load(split / "1" / ckpt.TRAINER_FILE, weights_only=True)
    assert set(end) == OLD_TRAINER_KEYS
    assert (end["epoch"], end["global_step"], end["steps_done_in_epoch"]) == (1, 2 * per_epoch, None)
    records = read_metrics(split / "metrics.jsonl")
    assert [r["resumed_from"] for r in records if r["type"] == "start"] == [None, "0-step3", "0-step3", f"1-step{stop}"]
    saves = [(r["step"], r["reason"]) for r in records if r["type"] == "step_checkpoint"]
    assert saves == [(2, "interval"), (3, "max_steps")] + [(s, "interval") for s in range(4, stop, 2) if s != per_epoch] \
        + [(stop, "max_steps")]


def test_keep_last_never_deletes_the_best(tmp_path):
    for name in ("0", "1-step5", "1", "2-step9", "2"):
        (tmp_path / name).mkdir()
        for f in ckpt.CHECKPOINT_FILES:
            (tmp_path / name / f).write_text("x")
    os.symlink("0", tmp_path / ckpt.BEST_LINK)
    os.symlink("2", tmp_path / ckpt.LATEST_LINK)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["0", "1-step5", "1", "2-step9", "2"]
    deleted = ckpt.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["1", "1-step5"]
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["0", "2-step9", "2"]
    assert ckpt.prune_checkpoints(tmp_path, 0) == []  # 0 keeps all


@pytest.fixture(scope="module")
def long_epoch_data(tiny_llama, tmp_path_factory):
    """Enough samples for ~18 optimizer steps per epoch, so a signal lands inside one."""
    return write_synthetic_hidden_states(tiny_llama, tmp_path_factory.mktemp("hs_long"), num_samples=48, seq_len=32)


@pytest.mark.slow
def test_sigterm_checkpoints_mid_epoch_and_resumes_bit_for_bit(tiny_llama, long_epoch_data, tmp_path):
    def cmd(save: Path) -> list[str]:
        return [sys.executable, "-m", "speculators", "train", "--verifier-name-or-path", str(tiny_llama),
                "--data-path", str(long_epoch_data), "--save-path", str(save), "--epochs", "2", "--lr", "2e-3",
                "--total-seq-len", "64", "--ttt-steps", "2", "--log-freq", "1000", "--warmup-steps", "1"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = subprocess.run(cmd(straight), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    proc = subprocess.Popen(cmd(split), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (split / "metrics.jsonl").is_file() and any(r["type"] == "train" for r in read_metrics(split / "metrics.jsonl")):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    latest = ckpt.latest_checkpoint(split)
    assert latest is not None and latest.name.startswith("0-step"), f"expected a mid-epoch checkpoint, got {latest}"
    records = read_metrics(split / "metrics.jsonl")
    assert records[-1] == {**records[-1], "type": "end", "status": "interrupted", "signal": "SIGTERM"}
    assert [r["reason"] for r in records if r["type"] == "step_checkpoint"] == ["SIGTERM"]
    assert max(train_losses(split)) == int(latest.name.split("step")[1])  # nothing past the checkpoint
    out = subprocess.run(cmd(split), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same_training(straight, split, "1")
    unique_step_records(split)


def test_from_pretrained_starts_from_that_checkpoint(tiny_llama, hs_data, tmp_path):
    """A vanishing lr (the schema refuses 0; 1e-30 is far below an fp32 ulp of these weights) keeps the
    weights where they start: equal to the --from-pretrained checkpoint's."""
    first = tmp_path / "first"
    run_training(make_cfg(tiny_llama, hs_data, first, epochs=1))
    again = tmp_path / "again"
    run_training(make_cfg(tiny_llama, hs_data, again, epochs=1, lr=1e-30, from_pretrained=str(first / "0"),
                          ttt_steps=3))
    a = load_file(str(first / "0" / "model.safetensors"))
    b = load_file(str(again / "0" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((again / "0" / "config.json").read_text())
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3  # this run's --ttt-steps
    fresh = tmp_path / "fresh"
    run_training(make_cfg(tiny_llama, hs_data, fresh, epochs=1, lr=1e-30))
    c = load_file(str(fresh / "0" / "model.safetensors"))
    assert not torch.equal(a["fc.weight"], c["fc.weight"])  # without it the draft starts elsewhere


@pytest.mark.parametrize("flag", ["checkpoint_every_steps", "keep_last_checkpoints"])
def test_negative_checkpoint_counts_are_refused(tiny_llama, hs_data, tmp_path, flag):
    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} must be a whole number >= 0"):
        make_cfg(tiny_llama, hs_data, tmp_path / "run", **{flag: -1})
