"""`torchrun --nproc_per_node 2` (FSDP2 over gloo, CPU), interrupted and resumed from a mid-epoch
checkpoint, matches one uninterrupted process on the same batches, acceptance measurements included."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from speculators.train.metrics_stream import read_metrics

from tests.support.synthetic import write_synthetic_hidden_states
from tests.support.train_helpers import run_train_cli


def _records(save, kind):
    return {r["step"]: r["metrics"] for r in read_metrics(save / "metrics.jsonl") if r["type"] == kind}


def _acceptance(save):
    return {r["step"]: [r["mean_acceptance_length"], *r["acceptance_rate_per_position"]]
            for r in read_metrics(save / "metrics.jsonl") if r["type"] == "acceptance"}


@pytest.mark.slow
def test_two_process_fsdp_matches_single_process(tiny_llama, tmp_path):
    data = write_synthetic_hidden_states(tiny_llama, tmp_path / "hs", num_samples=16, seq_len=40)
    common = ["--verifier-name-or-path", str(tiny_llama), "--data-path", str(data), "--epochs", "2",
              "--lr", "3e-3", "--total-seq-len", "96", "--ttt-steps", "2", "--num-layers", "2",
              "--log-freq", "1000", "--train-data-ratio", "0.75",
              "--eval-every-steps", "3", "--eval-prompts", "3", "--eval-max-tokens", "12"]
    dist_dir = tmp_path / "dist"

    # Interrupted after step 2 of epoch 0 (checkpoints every step, FSDP collectives), then resumed.
    dist = run_train_cli([*common, "--save-path", str(dist_dir), "--max-steps", "2", "--checkpoint-every-steps", "1"],
                         nproc=2)
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert (dist_dir / "0-step2").is_dir() and not (dist_dir / "0").exists()
    dist = run_train_cli([*common, "--save-path", str(dist_dir)], nproc=2)
    assert dist.returncode == 0, dist.stderr[-3000:]
    starts = [r for r in read_metrics(dist_dir / "metrics.jsonl") if r["type"] == "start"]
    assert [r["resumed_from"] for r in starts] == [None, "0-step2"]
    single = run_train_cli([*common, "--batches-per-step", "2", "--save-path", str(tmp_path / "single")])
    assert single.returncode == 0, single.stderr[-3000:]

    d_train, s_train = _records(dist_dir, "train"), _records(tmp_path / "single", "train")
    assert len(d_train) >= 4 and d_train.keys() == s_train.keys()
    for step in d_train:
        for key in ("loss", "loss_0", "loss_1", "full_acc_0", "full_acc_1", "cond_acc_1", "step_acc_1"):
            assert d_train[step][key] == pytest.approx(s_train[step][key], rel=1e-4, abs=1e-6), (step, key)
    d_val, s_val = _records(dist_dir, "val"), _records(tmp_path / "single", "val")
    for step in d_val:
        assert d_val[step]["loss"] == pytest.approx(s_val[step]["loss"], rel=1e-4)
        for key in ("full_acc_1", "cond_acc_1", "step_acc_1"):  # counts summed over ranks, not ratios
            assert d_val[step][key] == pytest.approx(s_val[step][key], abs=1e-9), (step, key)
    # Acceptance under FSDP: every rank gathers the full weights, rank 0 decodes (no deadlock), at
    # the same steps as one process and with the same figures (greedy decoding of nearly equal weights).
    d_acc, s_acc = _acceptance(dist_dir), _acceptance(tmp_path / "single")
    assert d_acc.keys() == s_acc.keys() and {3, 6} <= d_acc.keys()
    for step in d_acc:
        assert d_acc[step] == pytest.approx(s_acc[step], abs=1e-9), step
    a = load_file(str(dist_dir / "1" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "1" / "model.safetensors"))
    assert a.keys() == b.keys()
    # Weights after 8 Adam steps at lr 3e-3: Adam divides by sqrt(v), so a coordinate whose
    # gradient is nearly zero turns float reordering (reduce-scatter vs local accumulation)
    # into up to a few 1e-5 of movement; 1e-4 is still 3% of a single step's update.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    print(f"2-process vs 1-process, {len(d_train)} steps: final loss {d_train[max(d_train)]['loss']:.6f} "
          f"vs {s_train[max(s_train)]['loss']:.6f}")


@pytest.mark.slow
def test_a_refusal_on_rank_0_ends_every_rank(tiny_llama, tmp_path):
    """Rank 0 alone decides on the save path (and alone loads the acceptance verifier); when it
    refuses, the other rank must end with the reason instead of waiting on the broadcast forever."""
    data = write_synthetic_hidden_states(tiny_llama, tmp_path / "hs", num_samples=4, seq_len=24)
    save = tmp_path / "taken"
    (save / "0").mkdir(parents=True)  # holds an epoch checkpoint: refused with --no-resume-from-checkpoint
    run = run_train_cli(["--verifier-name-or-path", str(tiny_llama), "--data-path", str(data), "--epochs", "1",
                         "--total-seq-len", "48", "--save-path", str(save), "--no-resume-from-checkpoint"],
                        nproc=2, timeout=240)
    assert run.returncode != 0
    assert "already holds checkpoints" in run.stderr  # rank 0's own message
    assert "rank 0 failed: UserError" in run.stderr  # rank 1 told, not left waiting
