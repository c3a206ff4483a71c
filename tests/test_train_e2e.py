"""End-to-end CPU training: it learns, streams metrics, and rejects bad input clearly."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from speculators.errors import UserError
from speculators.metric_records import parse_line
from test_console import METRICS_LINE
from speculators.train.components import build_components
from speculators.config.train import TrainConfig
from speculators.train.distributed import DistInfo
from speculators.train.metrics_stream import read_metrics
from speculators.train.trainer import Trainer, run_training

from tests.support.synthetic import write_synthetic_hidden_states


@pytest.fixture(scope="module")
def hs_small(tiny_llama, tmp_path_factory):
    return write_synthetic_hidden_states(tiny_llama, tmp_path_factory.mktemp("hs_small"), num_samples=8, seq_len=24)


def cfg_for(verifier, data, save, **kw) -> TrainConfig:
    base = dict(verifier_name_or_path=str(verifier), data_path=str(data), save_path=str(save), epochs=1,
                lr=3e-3, total_seq_len=128, ttt_steps=3, log_freq=1000, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_step0_accuracy_rises_well_above_chance(tiny_llama_trained, tmp_path):
    data = write_synthetic_hidden_states(tiny_llama_trained, tmp_path / "hs", num_samples=48, seq_len=64)
    trainer = Trainer(build_components(cfg_for(tiny_llama_trained, data, tmp_path / "run", epochs=5), DistInfo()))
    before = trainer.validate()
    trainer.fit()
    after = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["type"] == "val"][-1]["metrics"]
    chance = 1.0 / trainer.draft.config.draft_vocab_size
    print(f"step-0 val accuracy before {before['full_acc_0']:.3f} after {after['full_acc_0']:.3f} "
          f"(chance {chance:.4f}); val loss {before['loss']:.3f} -> {after['loss']:.3f}; after: "
          + ", ".join(f"{m}_{k}={after[f'{m}_{k}']:.3f}" for k in range(3) for m in ("full_acc", "cond_acc", "step_acc")))
    assert after["full_acc_0"] > 0.5
    assert after["full_acc_0"] > before["full_acc_0"] + 0.2
    assert after["loss"] < 0.5 * before["loss"]
    assert after["step_acc_1"] > 0.3 and after["step_acc_2"] > 0.3  # later TTT steps learn too
    assert after["full_acc_0"] >= after["full_acc_1"] >= after["full_acc_2"] > 0.3  # and whole drafts get accepted


def test_metrics_stream_and_console(tiny_llama, hs_small, tmp_path, caplog):
    save = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="speculators.train"):
        run_training(cfg_for(tiny_llama, hs_small, save, epochs=2, log_freq=1, run_name="demo"))
    lines = [r.getMessage() for r in caplog.records if r.filename == "trainer.py"]
    out = "\n".join(lines)
    assert "train/loss_0=" in out and "train/full_acc_0=" in out and "epoch=0, lr=" in out
    assert "val/cond_acc_2=" in out and "val/step_acc_2=" in out
    records = read_metrics(save / "metrics.jsonl")
    assert all("ts" in r and "type" in r for r in records)
    typed = [parse_line(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [type(t).TYPE if t else None for t in typed] == [r["type"] for r in records]  # each line a typed record
    start, end = records[0], records[-1]
    assert start["type"] == "start" and start["run_name"] == "demo" and start["resumed_from"] is None
    assert start["epochs"] == 2 and start["total_steps"] >= 2 and start["steps_per_epoch"] >= 1
    assert end == {"type": "end", "ts": end["ts"], "status": "completed"}
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert train[-1]["step"] == start["total_steps"] == train[-1]["total_steps"]
    keys = {"loss", "lr", "tokens_per_s", "tokens"} | {f"{m}_{k}" for m in ("loss", "full_acc", "cond_acc", "step_acc")
                                             for k in range(3)}
    assert keys == set(train[0]["metrics"])
    # each step's trained tokens (the dashboard's tokens axis sums them): a whole, positive count
    assert all(r["metrics"]["tokens"] > 0 and r["metrics"]["tokens"] == int(r["metrics"]["tokens"]) for r in train)
    val = [r for r in records if r["type"] == "val"]
    assert len(val) == 2 and "lr" not in val[0]["metrics"] and "full_acc_0" in val[0]["metrics"]
    ck = [r for r in records if r["type"] == "checkpoint"]
    assert [c["epoch"] for c in ck] == [0, 1] and all(os.path.isdir(c["path"]) for c in ck)
    assert ck[0]["is_best"] is True


def test_truncated_metrics_line_is_repaired_on_append(tmp_path):
    from speculators.metric_records import EndRecord
    from speculators.train.metrics_stream import MetricsStream

    path = tmp_path / "m.jsonl"
    path.write_text('{"type": "start", "ts": 1}\n{"type": "tra')
    stream = MetricsStream(path)
    stream.write(EndRecord(status="completed"))
    stream.close()
    assert [r["type"] for r in read_metrics(path)] == ["start", "end"]


def _copy_data(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(data, **changes):
    from speculators.data import data_config

    path = data / "data_config.json"
    cfg = data_config.load(path)
    cfg.update(changes)
    data_config.write(path, cfg)


def test_mismatched_hidden_size_and_layer_count(tiny_llama, hs_small, tmp_path):
    bad = _copy_data(hs_small, tmp_path / "hidden")
    _edit_config(bad, hidden_size=32)
    with pytest.raises(UserError, match="hidden_size 32"):
        run_training(cfg_for(tiny_llama, bad, tmp_path / "r1"))
    bad = _copy_data(hs_small, tmp_path / "layers")
    _edit_config(bad, num_hidden_layers=12)
    with pytest.raises(UserError, match="num_hidden_layers 12"):
        run_training(cfg_for(tiny_llama, bad, tmp_path / "r2"))
    bad = _copy_data(hs_small, tmp_path / "ids")
    _edit_config(bad, layer_ids=[4, 2, 5, 8])  # any count >= 2 is valid now; order is not
    with pytest.raises(UserError, match="layer_ids .*ascending"):
        run_training(cfg_for(tiny_llama, bad, tmp_path / "r3"))


def test_vocab_mapping_disagreeing_with_draft_vocab_size(tiny_llama, hs_small, tmp_path):
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    t2d = np.zeros(vocab, dtype=bool)
    t2d[:64] = True
    np.save(tmp_path / "t2d.npy", t2d)
    np.save(tmp_path / "d2t.npy", np.zeros(64, dtype=np.int64))
    kw = dict(d2t_path=str(tmp_path / "d2t.npy"), t2d_path=str(tmp_path / "t2d.npy"))
    with pytest.raises(UserError, match="--draft-vocab-size 100"):
        run_training(cfg_for(tiny_llama, hs_small, tmp_path / "ok", draft_vocab_size=100, **kw))
    assert not (tmp_path / "ok" / "run.json").exists()  # a failed start leaves the save path unclaimed
    # consistent mapping trains a 64-token draft head
    result = run_training(cfg_for(tiny_llama, hs_small, tmp_path / "ok", draft_vocab_size=64, **kw))
    assert result.global_step >= 1
    cfg = json.loads((tmp_path / "ok" / "0" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 64


def test_empty_data_dir(tiny_llama, hs_small, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="data_config.json"):
        run_training(cfg_for(tiny_llama, empty, tmp_path / "r"))
    shutil.copy(hs_small / "data_config.json", empty / "data_config.json")
    with pytest.raises(UserError, match="no samples"):
        run_training(cfg_for(tiny_llama, empty, tmp_path / "r2"))


def test_corrupt_sample_skipped_with_warning_or_raised(tiny_llama, hs_small, tmp_path):
    bad = _copy_data(hs_small, tmp_path / "corrupt")
    (bad / "data_3.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="data_3.pt"):
        result = run_training(cfg_for(tiny_llama, bad, tmp_path / "r", train_data_ratio=1.0))
    assert result.global_step >= 1
    with pytest.raises(UserError, match="data_3.pt"):
        run_training(cfg_for(tiny_llama, bad, tmp_path / "r2", on_corrupt="raise", train_data_ratio=1.0))


def test_missing_logger_package_is_a_clear_error(tiny_llama, hs_small, tmp_path):
    import importlib.util

    missing = next((k for k in ("trackio", "wandb") if importlib.util.find_spec(k) is None), None)
    if missing is None:
        pytest.skip("both optional loggers are installed")
    with pytest.raises(UserError, match=f"pip install {missing}"):
        run_training(cfg_for(tiny_llama, hs_small, tmp_path / "r", logger=missing))


def test_cli_entry_points(tiny_llama, hs_small, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--verifier-name-or-path", str(tiny_llama), "--data-path", str(hs_small), "--epochs", "1",
            "--total-seq-len", "128", "--ttt-steps", "2", "--num-layers", "2"]
    out = subprocess.run([sys.executable, "-m", "speculators", "train", *args, "--save-path", str(tmp_path / "a")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # stdout is a pipe: plain text, and every metrics line in the seeds' shape
    assert "\x1b" not in out.stdout
    metric_lines = [ln for ln in out.stdout.splitlines() if "train/" in ln or "val/" in ln]
    assert metric_lines and all(METRICS_LINE.match(ln) for ln in metric_lines), metric_lines
    assert sum("train/loss_0=" in ln for ln in metric_lines) >= 1 and sum("val/" in ln for ln in metric_lines) == 1
    assert all(re.search(r"(?:, lr=\S+)  trainer\.py:\d+$", ln) for ln in metric_lines if "train/" in ln)
    assert all("step_acc_1=" in ln and "full_acc_1=" in ln and "cond_acc_1=" in ln for ln in metric_lines)
    out = subprocess.run([sys.executable, "-m", "speculators.train", *args, "--save-path", str(tmp_path / "a"),
                          "--no-resume-from-checkpoint"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error: --save-path" in out.stderr
