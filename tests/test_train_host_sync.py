"""--sync-every-steps: the step's metrics reach the host every N steps, with the same numbers.

Between syncs the stats stay on the device (no `.item()` / `.cpu()` per step); the train
records of a window go out together at its last step, before an epoch end, an acceptance
measurement, a checkpoint or a crash. A run with N = 3 must write the same losses, the same
records in the same order and the same weights as one with N = 1.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from speculators.metric_records import TrainRecord
from speculators.train.metrics_stream import read_metrics
from speculators.train.objective import counted_positions
from speculators.train.trainer import Trainer, run_training, sync_every

from tests.support.interrupt import Killed
from tests.support.train_helpers import make_cfg


def _records(save):
    return read_metrics(save / "metrics.jsonl")


def _without_rate(records):
    """The records less what differs between two identical runs (times, names, rates)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in ("ts", "run_name", "run_id", "path", "seconds")}
        if "metrics" in r:
            r["metrics"] = {k: v for k, v in r["metrics"].items() if k != "tokens_per_s"}
        out.append(r)
    return out


def test_every_three_steps_writes_what_every_step_writes(tiny_llama, hs_data, tmp_path):
    # a checkpoint every 2 steps and epoch ends that fall inside a window of 3: every flush point
    one, three = tmp_path / "one", tmp_path / "three"
    run_training(make_cfg(tiny_llama, hs_data, one, sync_every_steps=1, checkpoint_every_steps=2))
    run_training(make_cfg(tiny_llama, hs_data, three, sync_every_steps=3, checkpoint_every_steps=2))
    a, b = _records(one), _records(three)
    assert len([r for r in a if r["type"] == "train"]) >= 6
    assert _without_rate(a) == _without_rate(b)  # same types, order, steps, losses and accuracies
    assert all(r["metrics"]["tokens_per_s"] > 0 for r in b if r["type"] == "train")
    wa, wb = load_file(str(one / "1" / "model.safetensors")), load_file(str(three / "1" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_records_wait_for_the_window_and_survive_a_crash(tiny_llama, hs_data, tmp_path, monkeypatch):
    emitted_at: list[tuple[int, int]] = []  # (train_step calls so far, record step)
    calls = [0]
    real_step, real_emit = Trainer.train_step, None

    def train_step(self, batch):
        calls[0] += 1
        if calls[0] == 5:
            raise Killed("killed in step 5")
        return real_step(self, batch)

    def build_and_watch(self, components):
        nonlocal real_emit
        real_init(self, components)
        real_emit = self.sink.emit

        def emit(record):
            if isinstance(record, TrainRecord):
                emitted_at.append((calls[0], record.step))
            real_emit(record)

        self.sink.emit = emit

    real_init = Trainer.__init__
    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "__init__", build_and_watch)
    save = tmp_path / "run"
    with pytest.raises(Killed):
        run_training(make_cfg(tiny_llama, hs_data, save, sync_every_steps=3, epochs=3))
    # steps 1-3 go out together after the third step; 4 was pending when step 5 died and still went out
    assert emitted_at == [(3, 1), (3, 2), (3, 3), (5, 4)]
    assert [r["step"] for r in _records(save) if r["type"] == "train"] == [1, 2, 3, 4]


def test_loader_positions_give_the_objective_the_same_loss(tiny_llama, hs_data, tmp_path):
    """The gather indices the loader precomputes (no `nonzero` on the device) change nothing."""
    from speculators.train.components import build_components
    from speculators.train.distributed import setup_distributed

    cfg = make_cfg(tiny_llama, hs_data, tmp_path / "run", rows_per_batch=2)
    components = build_components(cfg, setup_distributed(cfg.device))
    try:
        trainer = Trainer(components)
        plan = trainer.data.plan(0)
        batch = next(iter(trainer.data.epoch_loader(plan, 0)))
        with_positions = dict(batch)  # what the loader yields: the indices precomputed on the host
        batch = {k: v for k, v in batch.items()
                 if k not in ("target_positions", "ttt_rows") and not k.startswith("step_positions_")}
        # independent reference for the indices: a loop over positions
        mask, docs = batch["loss_mask"].flatten(), batch["document_ids"].flatten()
        assert with_positions["target_positions"].tolist() == [
            i for i in range(mask.numel()) if mask[i] != 0 and docs[i] != -1]
        den = trainer._denominators(batch)
        torch.manual_seed(0)
        loss_a, stats_a = trainer._forward(batch, den)
        torch.manual_seed(0)
        loss_b, stats_b = trainer._forward(with_positions, den)
        assert torch.equal(loss_a, loss_b) and torch.equal(stats_a, stats_b)
        for k in range(cfg.ttt_steps):  # the objective's own on-device computation gives the same indices
            assert torch.equal(with_positions[f"step_positions_{k}"],
                               counted_positions(batch["loss_mask"], batch["document_ids"], cfg.ttt_steps)[
                                   f"step_positions_{k}"])
        skipped = {"ttt_rows"} if "ttt_rows" in with_positions else set()  # only when a position counts at no step
        assert set(with_positions) - set(batch) == {"target_positions"} | skipped | {
            f"step_positions_{k}" for k in range(cfg.ttt_steps)}
    finally:
        components.close()


def test_default_window():
    assert sync_every(None, torch.device("cpu")) == 1
    assert sync_every(None, torch.device("cuda")) == 16
    assert sync_every(4, torch.device("cpu")) == 4
