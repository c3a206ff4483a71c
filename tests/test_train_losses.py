"""Losses, metrics, LR schedule, vocab mapping checks and verifier targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.train.losses import kl_per_token, summarize
from speculators.train.objective import TTTObjective, step_token_counts
from speculators.train.schedule import lr_factor
from speculators.train.verifier import VerifierHead
from speculators.verifier import load_verifier_weights, read_verifier_config
from speculators.train.vocab import check_mapping, load_vocab_mapping


def test_kl_per_token_matches_definition():
    torch.manual_seed(0)
    draft = torch.randn(4, 7)
    target = torch.randn(4, 7)
    p = torch.softmax(target, -1)
    want = (p * (torch.log_softmax(target, -1) - torch.log_softmax(draft, -1))).sum(-1)
    got = kl_per_token(draft, torch.log_softmax(target, -1))
    torch.testing.assert_close(got, want)
    assert torch.allclose(kl_per_token(target, torch.log_softmax(target, -1)), torch.zeros(4), atol=1e-6)


def test_summarize_ratios_and_decay():
    # fields: loss_sum, count, correct, chain_correct (|A_k|), chain_total (|A_k-1|, |V_0| at k=0)
    stats = torch.tensor([[2.0, 4.0, 3.0, 3.0, 4.0], [3.0, 3.0, 2.0, 1.0, 3.0]])
    m = summarize(stats, decay=0.5)
    assert m["loss_0"] == 0.5 and m["loss_1"] == 1.0
    assert m["loss"] == pytest.approx(0.5 + 0.5 * 1.0)
    assert m["full_acc_0"] == 0.75 and m["full_acc_1"] == 0.25  # |A_1| / |V_0|
    assert m["cond_acc_0"] == 0.75 and m["cond_acc_1"] == pytest.approx(1 / 3)
    assert m["step_acc_0"] == 0.75 and m["step_acc_1"] == pytest.approx(2 / 3)
    # the seeds' console order: loss_k, full_acc_k, cond_acc_k, then the total loss
    assert list(m)[:3] == ["loss_0", "full_acc_0", "cond_acc_0"] and list(m)[-1] == "loss"


class _Oracle(Eagle3DraftModel):
    """Draft whose step-k logits are fixed tensors: isolates the metric bookkeeping."""

    def __init__(self, cfg, per_step_hidden):
        super().__init__(cfg)
        self.per_step_hidden = per_step_hidden

    def iter_ttt(self, hidden_states, input_ids, document_ids, position_ids, ttt_steps, query_rows=None):
        from speculators.models.eagle3.model import gather_rows

        for k in range(ttt_steps):  # (the objective asks for the counted rows only: hand those)
            h = self.per_step_hidden[k]
            yield k, h if query_rows is None else gather_rows(h, query_rows)


def test_objective_counts_full_and_conditional_accuracy():
    # vocab 2, hidden 2, identity lm_heads: logits == hidden; argmax = index of larger entry
    cfg = Eagle3Config(hidden_size=2, intermediate_size=4, num_attention_heads=1, num_key_value_heads=1,
                       head_dim=2, vocab_size=2, draft_vocab_size=2)
    t = 4
    target_hidden = torch.tensor([[[5.0, 0], [0, 5.0], [5.0, 0], [0, 5.0]]])  # argmax 0,1,0,1
    right = target_hidden.clone()
    wrong = target_hidden.flip(-1)
    step0 = torch.stack([right[0, 0], wrong[0, 1], right[0, 2], right[0, 3]])[None]  # wrong at i=1
    # step 1 at i predicts target i+1: right at i=0,1 ; wrong at i=2
    step1 = torch.stack([right[0, 1], right[0, 2], wrong[0, 3], right[0, 0]])[None]
    model = _Oracle(cfg, [step0, step1])
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.eye(2))
    head = VerifierHead(torch.ones(2), torch.eye(2), eps=1e-6)
    head.forward = lambda x: x.float()  # targets are the raw "hidden" logits
    obj = TTTObjective(model, head)
    batch = {
        "hidden_states": torch.zeros(1, t, 6), "input_ids": torch.zeros(1, t, dtype=torch.long),
        "position_ids": torch.arange(1, t + 1)[None], "document_ids": torch.zeros(1, t, dtype=torch.long),
        "loss_mask": torch.ones(1, t, dtype=torch.long), "verifier_last_hidden_states": target_hidden,
    }
    counts = step_token_counts(batch["loss_mask"], batch["document_ids"], 2)
    assert counts.tolist() == [4.0, 3.0]
    _, stats = obj(batch, ttt_steps=2, decay=1.0, denominators=counts)
    m = summarize(stats, 1.0)
    assert m["full_acc_0"] == m["cond_acc_0"] == m["step_acc_0"] == 0.75
    assert m["step_acc_1"] == pytest.approx(2 / 3)  # step 1 alone: i=0 right, i=1 right, i=2 wrong
    # steps 0 and 1 both right: i=0 only, of the 4 loss-masked starts (i=3 has no step 1)
    assert m["full_acc_1"] == 0.25
    # conditional: among starts whose step 0 agreed (i=0, 2, 3) -> step 1 right at i=0 only
    assert m["cond_acc_1"] == pytest.approx(1 / 3)


def test_lr_schedule_warmup_then_decay():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "linear") == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "none") == 1.0
    assert all(lr_factor(s, 100, 10) <= 1.0 + 1e-12 for s in range(100))
    assert not math.isnan(lr_factor(5, 5, 10))


def _write_mapping(tmp_path, d2t, t2d):
    np.save(tmp_path / "d2t.npy", np.asarray(d2t, dtype=np.int64))
    np.save(tmp_path / "t2d.npy", np.asarray(t2d, dtype=bool))
    return str(tmp_path / "d2t.npy"), str(tmp_path / "t2d.npy")


def test_vocab_mapping_checks(tmp_path):
    t2d = [True, False, True, True, False]
    d2t = [0, 1, 1]  # draft 0,1,2 -> verifier 0,2,3
    d, t = _write_mapping(tmp_path, d2t, t2d)
    got_d2t, got_t2d = load_vocab_mapping(d, t, None, 5, 3)
    assert got_d2t.tolist() == d2t and got_t2d.tolist() == t2d
    with pytest.raises(UserError, match="--draft-vocab-size 4"):
        load_vocab_mapping(d, t, None, 5, 4)
    with pytest.raises(UserError, match="disagree"):
        check_mapping(torch.tensor([0, 0, 1]), torch.tensor(t2d), 5, 3)
    with pytest.raises(UserError, match="verifier vocabulary has 6"):
        load_vocab_mapping(d, t, None, 6, None)
    with pytest.raises(UserError, match="together"):
        load_vocab_mapping(d, None, None, 5, None)
    # found in --data-path when not given; identity when absent
    assert load_vocab_mapping(None, None, str(tmp_path), 5, None)[0].tolist() == d2t
    ident = load_vocab_mapping(None, None, str(tmp_path / "nowhere"), 5, None)
    assert ident[0].tolist() == [0] * 5 and ident[1].all()
    with pytest.raises(UserError, match="needs a vocab mapping"):
        load_vocab_mapping(None, None, None, 5, 3)


def test_verifier_head_reproduces_verifier_logits_on_draft_vocab(tiny_llama):
    from transformers import AutoModelForCausalLM

    vconf = read_verifier_config(str(tiny_llama))
    weights = load_verifier_weights(str(tiny_llama), vconf)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    captured = {}
    model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    ids = torch.randint(0, vconf.vocab_size, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits[0]
    t2d = torch.zeros(vconf.vocab_size, dtype=torch.bool)
    t2d[::3] = True
    head = VerifierHead.from_weights(weights, t2d, vconf.rms_norm_eps)
    torch.testing.assert_close(head(captured["h"][0]), logits[:, t2d], atol=1e-4, rtol=1e-4)
