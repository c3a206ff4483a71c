"""Checkpoints: vLLM layout, best/latest links, bit-for-bit resume, run guard, killed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_model_eagle3 import assert_vllm_loadable

from speculators.errors import UserError
from speculators.train import checkpoint as ckpt
from speculators.train.config import TrainConfig
from speculators.train.metrics_stream import read_metrics
from speculators.train.synthetic import write_synthetic_hidden_states
from speculators.train.trainer import run_training


@pytest.fixture(scope="module")
def hs_data(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("hs_ckpt")
    return write_synthetic_hidden_states(tiny_llama, out, num_samples=12, seq_len=32)


def make_cfg(verifier, data, save, **kw) -> TrainConfig:
    base = dict(
        verifier_name_or_path=str(verifier), data_path=str(data), save_path=str(save), epochs=2, lr=2e-3,
        total_seq_len=64, ttt_steps=2, log_freq=1000, train_data_ratio=0.75, warmup_steps=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def train_losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["metrics"]["loss"] for r in read_metrics(save / "metrics.jsonl") if r["type"] == "train"}


def test_checkpoint_layout_links_and_vllm_keys(tiny_llama, hs_data, tmp_path):
    save = tmp_path / "run"
    run_training(make_cfg(tiny_llama, hs_data, save, epochs=3, num_layers=2))
    for epoch in range(3):
        for name in ckpt.CHECKPOINT_FILES:
            assert (save / str(epoch) / name).is_file()
    cfg = json.loads((save / "0" / "config.json").read_text())
    from speculators.models.eagle3 import Eagle3Config

    assert_vllm_loadable(save / "2", 2, Eagle3Config.from_speculators_dict(cfg))
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


def test_resume_continues_bit_for_bit(tiny_llama, hs_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_training(make_cfg(tiny_llama, hs_data, straight))
    per_epoch = len([s for s in train_losses(straight)]) // 2
    first = run_training(make_cfg(tiny_llama, hs_data, split, max_steps=per_epoch))
    assert first["stopped"] and (split / "0").is_dir() and not (split / "1").exists()
    second = run_training(make_cfg(tiny_llama, hs_data, split))
    assert not second["stopped"]
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
    assert [s["resumed_from"] for s in starts] == [None, 0]


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
    assert starts[-1]["resumed_from"] == int(done.name)
    assert ckpt.latest_checkpoint(save).name == str(int(done.name) + 2)
