"""full_acc / cond_acc / step_acc (docs/training.md) against a brute-force oracle.

The trainer's objective runs over random packed batches (padding, several documents per
row, loss-mask gaps, starts near a row's or document's end whose later TTT steps have no
target); a plain-Python loop over positions and steps says what each metric must be.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.train.losses import summarize
from speculators.train.objective import TTTObjective, step_token_counts
from speculators.train.verifier import VerifierHead

V = 6  # vocab == hidden size: with identity heads the "hidden" state is the logits


class _FixedLogits(Eagle3DraftModel):
    """A draft whose step-k output is a given tensor: isolates the metric bookkeeping."""

    def __init__(self, cfg, per_step):
        super().__init__(cfg)
        self.per_step = per_step

    def iter_ttt(self, hidden_states, input_ids, document_ids, position_ids, ttt_steps, query_rows=None):
        from speculators.models.eagle3.model import gather_rows

        for k in range(ttt_steps):  # (the objective asks for the counted rows only: hand those)
            yield k, self.per_step[k] if query_rows is None else gather_rows(self.per_step[k], query_rows)


def _objective(per_step) -> TTTObjective:
    cfg = Eagle3Config(hidden_size=V, intermediate_size=4, num_attention_heads=1, num_key_value_heads=1,
                       head_dim=V, vocab_size=V, draft_vocab_size=V)
    model = _FixedLogits(cfg, per_step)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.eye(V))
    head = VerifierHead(torch.ones(V), torch.eye(V), eps=1e-6)
    head.forward = lambda x: x.float()  # targets are the raw "hidden" logits
    return TTTObjective(model, head, loss_impl="eager")


def _random_case(seed: int, rows: int = 4, t: int = 14, k_steps: int = 4):
    """A packed batch and draft logits that agree with the verifier often (not always)."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.full((rows, t), -1, dtype=torch.long)
    for b in range(rows):
        pos, d = 0, 0
        end = t - int(torch.randint(0, 4, (1,), generator=g))  # some rows end in padding
        while pos < end:
            n = int(torch.randint(2, 7, (1,), generator=g))
            docs[b, pos:min(pos + n, end)] = d
            pos, d = pos + n, d + 1
    loss_mask = (torch.rand(rows, t, generator=g) < 0.8).long() * (docs != -1)
    target = torch.randn(rows, t, V, generator=g)
    per_step = []
    for k in range(k_steps):
        shifted = torch.cat([target[:, k:], torch.randn(rows, k, V, generator=g)], dim=1)
        agree = torch.rand(rows, t, 1, generator=g) < 0.75
        per_step.append(torch.where(agree, 4 * shifted, torch.randn(rows, t, V, generator=g)))
    batch = {
        "hidden_states": torch.zeros(rows, t, 3 * V), "input_ids": torch.zeros(rows, t, dtype=torch.long),
        "position_ids": torch.arange(1, t + 1).expand(rows, t), "document_ids": docs,
        "loss_mask": loss_mask, "verifier_last_hidden_states": target,
    }
    return batch, per_step


def _oracle(batch, per_step, rows=None) -> dict[str, Fraction]:
    """The definitions, position by position, in plain Python (exact fractions)."""
    docs, mask = batch["document_ids"].tolist(), batch["loss_mask"].tolist()
    target = batch["verifier_last_hidden_states"]
    k_steps = len(per_step)
    rows = range(len(docs)) if rows is None else rows
    starts = 0
    all_right = [0] * k_steps       # |A_k|: steps 0..k all exist and all right
    step_right = [0] * k_steps      # step k right, among starts where step k exists
    step_count = [0] * k_steps
    for b in rows:
        t = len(docs[b])
        for i in range(t):
            def counted(k):
                return (i + k < t and docs[b][i] != -1 and docs[b][i + k] == docs[b][i]
                        and mask[b][i + k] == 1)

            def right(k):
                return int(per_step[k][b, i].argmax()) == int(target[b, i + k].argmax())

            for k in range(k_steps):
                if counted(k):
                    step_count[k] += 1
                    step_right[k] += right(k)
            if not counted(0):
                continue
            starts += 1
            for k in range(k_steps):
                if all(counted(j) and right(j) for j in range(k + 1)):
                    all_right[k] += 1
    out = {}
    for k in range(k_steps):
        prev = starts if k == 0 else all_right[k - 1]
        out[f"full_acc_{k}"] = Fraction(all_right[k], starts)
        out[f"cond_acc_{k}"] = Fraction(all_right[k], prev) if prev else Fraction(0)
        out[f"step_acc_{k}"] = Fraction(step_right[k], step_count[k]) if step_count[k] else Fraction(0)
    return out


def _stats(batch, per_step, rows=slice(None)):
    part = {key: v[rows] for key, v in batch.items()}
    k_steps = len(per_step)
    counts = step_token_counts(part["loss_mask"], part["document_ids"], k_steps)
    with torch.no_grad():
        _, stats = _objective([p[rows] for p in per_step])(part, k_steps, 1.0, counts)
    return stats


@pytest.mark.parametrize("seed", range(6))
def test_metrics_equal_the_brute_force_oracle(seed):
    batch, per_step = _random_case(seed)
    want = _oracle(batch, per_step)
    got = summarize(_stats(batch, per_step), decay=1.0)
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12), key
    # the case has starts whose later steps do not exist (row / document end, mask gaps)
    counts = step_token_counts(batch["loss_mask"], batch["document_ids"], len(per_step))
    assert counts[-1] < counts[0]


@pytest.mark.parametrize("seed", range(6))
def test_full_acc_is_cumulative_and_the_product_of_cond_acc(seed):
    batch, per_step = _random_case(seed)
    m = summarize(_stats(batch, per_step), decay=1.0)
    k_steps = len(per_step)
    full = [m[f"full_acc_{k}"] for k in range(k_steps)]
    assert all(a >= b for a, b in zip(full, full[1:])), full
    assert full[0] == m["cond_acc_0"] == m["step_acc_0"]  # one step: all three agree
    for k in range(k_steps):
        if all(m[f"cond_acc_{j}"] > 0 for j in range(k)):  # product defined (no 0/0 before k)
            assert full[k] == pytest.approx(math.prod(m[f"cond_acc_{j}"] for j in range(k + 1)), rel=1e-12)
        assert full[k] <= m[f"step_acc_{k}"] + 1e-12  # a chain is right only where step k is
    assert full[-1] < m[f"step_acc_{k_steps - 1}"]  # cumulative differs from step k alone here


@pytest.mark.parametrize("seed", range(4))
def test_two_ranks_sum_to_one_rank_over_all_data(seed):
    """Stats are sums: rank 0's rows + rank 1's rows (an uneven split, as the packer makes)
    reduced by summing (what `all_reduce_sum` and gradient accumulation do) give the metrics of
    one process over all rows; averaging the ranks' ratios would not."""
    batch, per_step = _random_case(seed, rows=5)
    whole = summarize(_stats(batch, per_step), decay=1.0)
    r0, r1 = _stats(batch, per_step, slice(0, 1)), _stats(batch, per_step, slice(1, 5))
    reduced = summarize(r0 + r1, decay=1.0)
    want = _oracle(batch, per_step)
    for key, value in want.items():
        assert reduced[key] == pytest.approx(whole[key], abs=1e-12), key
        assert reduced[key] == pytest.approx(float(value), abs=1e-12), key
    assert reduced["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    # the split is informative: the mean of per-rank ratios is not the global ratio
    m0, m1 = summarize(r0, 1.0), summarize(r1, 1.0)
    assert any(abs((m0[k] + m1[k]) / 2 - whole[k]) > 1e-6 for k in want)
    # the rank-0 part alone equals the oracle over that row
    part0 = _oracle(batch, per_step, rows=[0])
    assert all(m0[k] == pytest.approx(float(v), abs=1e-12) for k, v in part0.items())


def test_trackers_get_the_three_accuracies(tmp_path):
    """The tensorboard tracker (the one installed here) records every metric under its name."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from speculators.train.loggers import ExperimentLogger

    batch, per_step = _random_case(0)
    metrics = summarize(_stats(batch, per_step), decay=1.0)
    exp = ExperimentLogger("tensorboard", str(tmp_path), "run", {})
    exp.log("train", metrics, step=3)
    exp.close()
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for k in range(len(per_step)):
        for name in ("full_acc", "cond_acc", "step_acc"):
            (event,) = acc.Scalars(f"train/{name}_{k}")
            assert event.step == 3 and event.value == pytest.approx(metrics[f"{name}_{k}"], rel=1e-6)
    assert {"train/loss", "train/loss_0"} <= tags
