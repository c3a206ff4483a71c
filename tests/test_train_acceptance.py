"""Acceptance while training: each AcceptanceRecord equals `speculators eval` of the checkpoint
saved at that step on the same held-out prompts, records appear at the configured steps, and
--best-by acceptance makes checkpoint_best the epoch with the highest acceptance."""

from __future__ import annotations

import os

import pytest

from speculators.data.dataset import split_indices
from speculators.errors import UserError
from speculators.evaluate.runner import EvalSettings, evaluate_checkpoint
from speculators.train.metrics_stream import read_metrics
from speculators.train.trainer import run_training

from tests.support.synthetic import write_synthetic_hidden_states
from tests.support.train_helpers import make_cfg

SAMPLES, RATIO, PROMPTS, TOKENS = 16, 0.5, 6, 24


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    """3 epochs, acceptance every 3 steps and at epoch ends, checkpoints every 3 steps, best by acceptance."""
    root = tmp_path_factory.mktemp("acc")
    data = write_synthetic_hidden_states(tiny_llama, root / "hs", num_samples=SAMPLES, seq_len=32)
    save = root / "save"
    cfg = make_cfg(tiny_llama, data, save, epochs=3, lr=2e-2, train_data_ratio=RATIO, eval_every_steps=3,
                   checkpoint_every_steps=3, eval_prompts=PROMPTS, eval_max_tokens=TOKENS, best_by="acceptance")
    run_training(cfg)
    return data, save, read_metrics(save / "metrics.jsonl")


def _of(records, kind):
    return [r for r in records if r["type"] == kind]


def _checkpoint_dir(save, step, records):
    for r in _of(records, "checkpoint") + _of(records, "step_checkpoint"):
        if r["step"] == step:
            return r["path"]
    raise AssertionError(f"no checkpoint at step {step}")


@pytest.mark.slow
def test_records_equal_eval_of_the_saved_checkpoint(run):
    data, save, records = run
    acceptance = _of(records, "acceptance")
    assert acceptance
    held_out = split_indices(SAMPLES, 1 - RATIO, 0)[1]  # the rows the trainer validates on (eval --val-fraction)
    lengths = set()
    for rec in acceptance:
        report = evaluate_checkpoint(_checkpoint_dir(save, rec["step"], records), None, data,
                                     EvalSettings(num_speculative_tokens=2, max_new_tokens=TOKENS, device="cpu"),
                                     num_prompts=PROMPTS, indices=held_out)
        assert rec["mean_acceptance_length"] == pytest.approx(report["mean_acceptance_length"], abs=1e-12), rec
        assert rec["acceptance_rate_per_position"] == pytest.approx(report["acceptance_rate_per_position"],
                                                                    abs=1e-12), rec
        assert rec["prompts"] == report["num_prompts"] == PROMPTS
        assert rec["tokens"] == report["generated_tokens"] and rec["seconds"] > 0
        lengths.add(round(rec["mean_acceptance_length"], 9))
    assert len(lengths) > 1, "acceptance never moved: the comparison would not tell drafts apart"


@pytest.mark.slow
def test_records_at_the_configured_steps(run):
    _, _, records = run
    ends = [r["step"] for r in _of(records, "checkpoint")]
    total = _of(records, "start")[0]["total_steps"]
    expected = sorted({s for s in range(1, total + 1) if s % 3 == 0} | set(ends))
    assert [r["step"] for r in _of(records, "acceptance")] == expected
    assert len(ends) == 3


@pytest.mark.slow
def test_best_by_acceptance_picks_the_highest(run):
    _, save, records = run
    at_step = {r["step"]: r["mean_acceptance_length"] for r in _of(records, "acceptance")}
    ends = _of(records, "checkpoint")
    scores = [at_step[c["step"]] for c in ends]
    best = ends[scores.index(max(scores))]  # the first epoch reaching the highest acceptance
    assert os.readlink(save / "checkpoint_best") == os.path.basename(best["path"])
    assert [c["is_best"] for c in ends if c["is_best"]] and ends[-1]["best_by"] == "acceptance"
    assert all(c["score"] == at_step[c["step"]] for c in ends)
    assert len(set(scores)) > 1, "every epoch scored the same: any choice would pass"


def test_best_by_acceptance_without_prompts_is_refused(tiny_llama, hs_data, tmp_path):
    with pytest.raises(UserError, match="--best-by acceptance"):
        run_training(make_cfg(tiny_llama, hs_data, tmp_path / "s", train_data_ratio=1.0, best_by="acceptance"))
    with pytest.raises(UserError, match="--best-by acceptance"):
        run_training(make_cfg(tiny_llama, hs_data, tmp_path / "s2", eval_prompts=0, best_by="acceptance"))
