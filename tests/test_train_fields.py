"""Each training setting below changes what the trainer does: every test fails when its
field is ignored (ttt_step_loss_decay, rows_per_batch, scheduler, warmup_ratio,
weight_decay, max_grad_norm, num_workers, metrics_file)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from speculators.train.components import build_components
from speculators.config.train import TrainConfig
from speculators.train.distributed import DistInfo
from speculators.train.trainer import Trainer

from tests.support.synthetic import write_synthetic_hidden_states


@pytest.fixture(scope="module")
def hs(tiny_llama, tmp_path_factory):
    return write_synthetic_hidden_states(tiny_llama, tmp_path_factory.mktemp("hs_fields"), num_samples=12, seq_len=24)


def built(tiny_llama, hs, tmp_path, **kw) -> Trainer:
    base = dict(verifier_name_or_path=str(tiny_llama), data_path=str(hs), save_path=str(tmp_path / "ck"), epochs=1,
                lr=1e-2, total_seq_len=64, ttt_steps=3, log_freq=1000, train_data_ratio=0.75, seed=0)
    base.update(kw)
    return Trainer(build_components(TrainConfig(**base), DistInfo()))


def first_batch(trainer: Trainer) -> dict[str, torch.Tensor]:
    return next(trainer.data.batches(0))


def reference_ttt_loss(trainer: Trainer, batch: dict[str, torch.Tensor], decay: float) -> tuple[float, list[float]]:
    """The TTT loss written out in plain PyTorch from the draft's logits and the verifier's targets:
    step k at position i is counted when i + k is in the row, in i's document and loss-masked; its
    loss is KL(verifier(i + k) || draft step k (i)); loss_k is the mean over counted positions and the
    loss is sum_k decay**k * loss_k."""
    draft, head = trainer.draft, trainer.objective.verifier_head
    k_steps = trainer.cfg.ttt_steps
    with torch.no_grad():
        x = batch["verifier_last_hidden_states"].double()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + head.eps)
        target_logp = torch.log_softmax((head.norm_weight.double() * x) @ head.weight.double().t(), dim=-1)
        draft_logp = [torch.log_softmax(draft.lm_head(h).double(), dim=-1) for _, h in draft.iter_ttt(
            batch["hidden_states"], batch["input_ids"], batch["document_ids"], batch["position_ids"], k_steps)]
    docs, mask = batch["document_ids"].tolist(), batch["loss_mask"].tolist()
    per_step = []
    for k in range(k_steps):
        kls = []
        for b, row in enumerate(docs):
            for i in range(len(row) - k):
                if row[i] != -1 and row[i + k] == row[i] and mask[b][i + k]:
                    p = target_logp[b, i + k]
                    kls.append(float((p.exp() * (p - draft_logp[k][b, i])).sum()))
        per_step.append(sum(kls) / len(kls))
    return sum(decay**k * loss_k for k, loss_k in enumerate(per_step)), per_step


def test_ttt_step_loss_decay_weights_step_k_by_decay_to_the_k(tiny_llama, hs, tmp_path):
    from speculators.train.losses import summarize
    from speculators.train.step_data import to_device

    trainer = built(tiny_llama, hs, tmp_path, ttt_step_loss_decay=0.5)
    batch = to_device(first_batch(trainer), trainer.device, trainer.data_dtype)
    with torch.no_grad():
        loss, stats = trainer._forward(batch, trainer._denominators(batch))
    expected, per_step = reference_ttt_loss(trainer, batch, decay=0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    metrics = summarize(stats, 0.5)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert [metrics[f"loss_{k}"] for k in range(3)] == pytest.approx(per_step, rel=1e-5)
    assert expected < sum(per_step) * 0.99  # decay 1.0 would give the plain sum


def test_rows_per_batch_packs_that_many_rows(tiny_llama, hs, tmp_path):
    for rows in (1, 3):
        batch = first_batch(built(tiny_llama, hs, tmp_path / str(rows), rows_per_batch=rows))
        assert batch["input_ids"].shape == (rows, 64)


def lr_oracle(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine/linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind,ratio", [("linear", 0.5), ("cosine", 0.25), ("none", 0.0)])
def test_scheduler_and_warmup_ratio_shape_the_learning_rate(tiny_llama, hs, tmp_path, kind, ratio):
    trainer = built(tiny_llama, hs, tmp_path, scheduler=kind, warmup_ratio=ratio, epochs=4)
    total = trainer.data.total_steps
    warmup = int(ratio * total)
    assert total >= 8
    lrs = []
    for _ in range(total):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    expected = [1e-2 * (1.0 if kind == "none" and s >= warmup else lr_oracle(s, total, warmup, kind)) for s in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_weight_decay_reaches_the_optimizer(tiny_llama, hs, tmp_path):
    trainer = built(tiny_llama, hs, tmp_path, weight_decay=0.37)
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.37}


def test_max_grad_norm_clips_the_update(tiny_llama, hs, tmp_path):
    def change(max_grad_norm: float) -> float:
        trainer = built(tiny_llama, hs, tmp_path / str(max_grad_norm), max_grad_norm=max_grad_norm, warmup_steps=0)
        before = [p.detach().clone() for p in trainer.params]
        trainer.train_step(first_batch(trainer))
        return sum(float((p.detach() - b).norm()) for p, b in zip(trainer.params, before))

    free = change(0.0)  # 0: no clipping
    clipped = change(1e-12)  # gradients scaled far below AdamW's eps: almost no step
    assert free > 0 and clipped < 1e-3 * free


def test_num_workers_reaches_the_data_loader(tiny_llama, hs, tmp_path):
    trainer = built(tiny_llama, hs, tmp_path, num_workers=2)
    assert trainer.data.epoch_loader(trainer.data.plan(0), 0).num_workers == 2
    unset = built(tiny_llama, hs, tmp_path / "unset")
    assert unset.data.epoch_loader(unset.data.plan(0), 0).num_workers == 0


def test_unset_num_workers_prefetches_only_on_cuda_disk_data():
    """On CUDA the next steps' hidden states load in workers (they took half of an H200 step
    without them); on the CPU workers would take the step's cores, and the online store
    prefetches over HTTP itself."""
    from speculators.train.step_data import loader_workers

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert loader_workers(None, cuda, online=False) == 4
    assert loader_workers(None, cuda, online=True) == 0
    assert loader_workers(None, cpu, online=False) == 0
    assert loader_workers(1, cuda, online=True) == 1 and loader_workers(0, cuda, online=False) == 0


def test_metrics_file_receives_the_stream(tiny_llama, hs, tmp_path):
    target = tmp_path / "elsewhere" / "m.jsonl"
    trainer = built(tiny_llama, hs, tmp_path, metrics_file=str(target), max_steps=1)
    trainer.fit()
    kinds = [json.loads(line)["type"] for line in target.read_text().splitlines()]
    assert kinds[0] == "start" and "train" in kinds
    assert not (tmp_path / "ck" / "metrics.jsonl").exists()  # not the default place


def test_schedule_from_transformers_keeps_the_previous_values():
    """speculators.train.schedule now uses transformers' schedules; these are the values of the
    hand-written schedule it replaced (lr_oracle), over short, long and all-warmup runs."""
    from speculators.train.schedule import lr_factor

    for kind in ("cosine", "linear"):
        for total in (1, 2, 5, 37, 1000):
            for warmup in (0, 1, 3, 10, 50):
                for step in range(total + 1):
                    assert lr_factor(step, total, warmup, kind) == pytest.approx(
                        lr_oracle(step, total, warmup, kind), abs=1e-12), (kind, total, warmup, step)
    assert [lr_factor(s, 10, 4, "none") for s in range(10)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)
