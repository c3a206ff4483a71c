"""`--freeze-lm-head`: the draft's lm_head kept at the verifier's rows, as the public package trains.

Checked against independent references: the verifier's lm_head read by transformers, the TTT
loss and its gradients written out with plain autograd (log_softmax, no fused function) on a
float64 copy of the draft, the matmuls autograd really dispatches (a TorchDispatchMode), and
the optimizer state and gradients a real step allocates, against the memory estimate's drop.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from speculators.config.memory import VerifierDims, estimate_train_memory, read_verifier_dims, train_memory_estimate
from speculators.config.train import TrainConfig
from speculators.errors import UserError
from speculators.train import checkpoint as ckpt
from speculators.train.components import build_components
from speculators.train.distributed import DistInfo
from speculators.train.lm_head_kl import lm_head_kl
from speculators.train.step_data import to_device
from speculators.train.trainer import Trainer

from tests.support.train_helpers import make_cfg, run_train_cli

STEPS = 3


def built(verifier, data, save, **kw) -> Trainer:
    return Trainer(build_components(make_cfg(verifier, data, save, ttt_steps=3, lr=1e-2, warmup_steps=0, **kw),
                                    DistInfo()))


def draft_vocab(verifier, directory: Path, every: int = 3) -> dict[str, str]:
    """A reduced draft vocabulary (every `every`-th verifier id) as d2t.npy/t2d.npy; train kwargs."""
    import numpy as np

    vocab = json.loads((Path(verifier) / "config.json").read_text())["vocab_size"]
    ids = np.arange(0, vocab, every)
    t2d = np.zeros(vocab, dtype=bool)
    t2d[ids] = True
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "d2t.npy", ids - np.arange(len(ids)))
    np.save(directory / "t2d.npy", t2d)
    return {"d2t_path": str(directory / "d2t.npy"), "t2d_path": str(directory / "t2d.npy")}


def verifier_rows(verifier, t2d: torch.Tensor) -> torch.Tensor:
    """The verifier's lm_head rows of the draft vocabulary, read by transformers (not our loader)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(verifier), torch_dtype=torch.float32)
    return model.lm_head.weight.detach()[t2d.bool()]


def first_batch(trainer: Trainer) -> dict[str, torch.Tensor]:
    return to_device(next(trainer.data.batches(0)), trainer.device, trainer.data_dtype)


# ------------------------------------------------------------------ training with the head frozen
def test_frozen_head_stays_at_the_verifier_rows_while_the_rest_trains(tiny_llama, hs_data, tmp_path):
    save = tmp_path / "frozen"
    trainer = built(tiny_llama, hs_data, save, freeze_lm_head=True, max_steps=STEPS,
                    **draft_vocab(tiny_llama, tmp_path / "vocab"))
    draft = trainer.draft
    head = draft.lm_head.weight
    rows = verifier_rows(tiny_llama, draft.t2d)
    assert rows.shape[0] == int(draft.t2d.sum()) < draft.t2d.numel()  # a real subset of the verifier's rows
    assert not head.requires_grad and torch.equal(head.detach(), rows)
    before = {n: p.detach().clone() for n, p in draft.named_parameters()}
    result = trainer.fit()
    assert result.global_step == STEPS
    assert torch.equal(head.detach(), rows)  # bitwise: never stepped
    changed = {n for n, p in draft.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in draft.named_parameters() if n not in ("lm_head.weight", "embed_tokens.weight")}
    assert changed == trainable  # every other trained tensor moved
    # the checkpoint still holds the head (vLLM loads it), at the verifier's rows
    saved = load_file(str(ckpt.latest_checkpoint(save) / ckpt.MODEL_FILE))
    assert torch.equal(saved["lm_head.weight"], rows)
    assert json.loads((save / ckpt.RUN_FILE).read_text())["args"]["freeze_lm_head"] is True


def test_optimizer_holds_every_trainable_tensor_but_the_head(tiny_llama, hs_data, tmp_path):
    trained = built(tiny_llama, hs_data, tmp_path / "a")
    frozen = built(tiny_llama, hs_data, tmp_path / "b", freeze_lm_head=True)

    def held(trainer):
        return [p for g in trainer.optimizer.param_groups for p in g["params"]]

    assert any(p is trained.draft.lm_head.weight for p in held(trained))
    assert not any(p is frozen.draft.lm_head.weight for p in held(frozen))
    assert len(held(frozen)) == len(held(trained)) - 1
    v, h = frozen.draft.lm_head.weight.shape
    assert sum(p.numel() for p in held(frozen)) == sum(p.numel() for p in held(trained)) - v * h
    assert sum(p.numel() for p in frozen.params) == sum(p.numel() for p in held(frozen))
    muon = built(tiny_llama, hs_data, tmp_path / "c", freeze_lm_head=True, optimizer="muon")
    assert not any(p is muon.draft.lm_head.weight for p in held(muon))  # neither Muon's nor AdamW's


# ------------------------------------------------------------------ gradients against plain autograd
def reference_loss(draft, head, batch, k_steps: int) -> torch.Tensor:
    """The TTT loss in float64 with plain autograd: step k at position i counts when i + k is in
    the row, in i's document and loss-masked; KL(verifier(i + k) || softmax(lm_head(draft step k
    at i))) averaged over step k's counted positions, summed over k (decay 1)."""
    x = batch["verifier_last_hidden_states"].double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + head.eps)
    target = torch.log_softmax((head.norm_weight.double() * x) @ head.weight.double().t(), dim=-1)
    docs, mask = batch["document_ids"].tolist(), batch["loss_mask"].tolist()
    total = torch.zeros((), dtype=torch.float64)
    steps = draft.iter_ttt(batch["hidden_states"].double(), batch["input_ids"], batch["document_ids"],
                           batch["position_ids"], k_steps)
    for k, normed in steps:
        at = [(b, i) for b, row in enumerate(docs) for i in range(len(row) - k)
              if row[i] != -1 and row[i + k] == row[i] and mask[b][i + k]]
        bi, ii = torch.tensor([a for a, _ in at]), torch.tensor([i for _, i in at])
        logq = torch.log_softmax(draft.lm_head(normed[bi, ii]), dim=-1)
        p_log = target[bi, ii + k]
        total = total + (p_log.exp() * (p_log - logq)).sum(-1).mean()
    return total


@pytest.mark.parametrize("loss_impl", ["fused", "chunked", "eager"])
def test_gradients_of_the_other_weights_match_plain_autograd(tiny_llama, hs_data, tmp_path, loss_impl):
    trainer = built(tiny_llama, hs_data, tmp_path / loss_impl, freeze_lm_head=True, loss_impl=loss_impl,
                    loss_chunk_rows=7, **draft_vocab(tiny_llama, tmp_path / "vocab", every=2))
    batch = first_batch(trainer)
    reference = copy.deepcopy(trainer.draft).double()
    assert not reference.lm_head.weight.requires_grad
    loss, _ = trainer._forward(batch, trainer._denominators(batch))
    loss.backward()
    expected = reference_loss(reference, trainer.objective.verifier_head, batch, trainer.cfg.ttt_steps)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert trainer.draft.lm_head.weight.grad is None and reference.lm_head.weight.grad is None
    ours = dict(trainer.draft.named_parameters())
    compared = 0
    for name, p in reference.named_parameters():
        if not p.requires_grad:
            continue
        assert ours[name].grad is not None, name
        torch.testing.assert_close(ours[name].grad.double(), p.grad, rtol=1e-4, atol=1e-7, msg=name)
        compared += 1
    assert compared == len(trainer.params)


# ------------------------------------------------------------------ the skipped weight-gradient matmul
class MatmulShapes(TorchDispatchMode):
    """Output shapes of every matmul aten op dispatched while active."""

    OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear")

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.OPS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("impl", ["fused", "chunked", "eager"])
def test_a_frozen_head_makes_no_weight_gradient_matmul(impl):
    n, h, v, m = 10, 6, 7, 12
    g = torch.Generator().manual_seed(0)
    target = torch.log_softmax(torch.randn(m, v, generator=g), -1)
    rows = torch.randint(0, m, (n,), generator=g)
    counts = {}
    for frozen in (False, True):
        head = nn.Linear(h, v, bias=False)
        head.weight.requires_grad_(not frozen)
        hidden = torch.randn(n, h, generator=g, requires_grad=True)
        loss, _, _ = lm_head_kl(hidden, head, target, rows, 1.0, impl, chunk_rows=4)
        with MatmulShapes() as seen:
            loss.backward()
        counts[frozen] = (seen.shapes.count((v, h)), seen.shapes.count((n, h)) + seen.shapes.count((4, h)))
        assert (head.weight.grad is None) == frozen
        assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    assert counts[False][0] > 0 and counts[True][0] == 0  # the [V, H] weight gradient: made only when trained
    assert counts[True][1] == counts[False][1] > 0  # the hidden states' gradient: made either way


# ------------------------------------------------------------------ memory, settings, resume
def test_memory_estimate_drops_the_heads_gradient_and_adamw_state():
    dims = VerifierDims(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128,
                        vocab_size=128256, num_hidden_layers=32)
    kw = dict(total_seq_len=2048, ttt_steps=3, draft_vocab_size=32000)
    trained, frozen = estimate_train_memory(dims, **kw), estimate_train_memory(dims, freeze_lm_head=True, **kw)
    assert trained.total - frozen.total == 3 * 4 * 4096 * 32000  # 1.46 GiB: gradient, exp_avg, exp_avg_sq
    assert trained.parts["weights"] == frozen.parts["weights"]  # the head is still held
    cfg = TrainConfig(verifier_name_or_path="m", total_seq_len=2048, draft_vocab_size=32000, freeze_lm_head=True)
    assert train_memory_estimate(cfg, dims, "cpu").total == estimate_train_memory(dims, **kw).total - 3 * 4 * 4096 * 32000


def test_estimate_drop_is_what_a_real_step_no_longer_allocates(tiny_llama, hs_data, tmp_path):
    """Gradients (before zero_grad) plus AdamW state after one real step, trained minus frozen,
    equal the estimate's difference for the same shapes (AdamW's per-tensor step counter aside)."""
    def step_bytes(trainer: Trainer) -> int:
        batch = first_batch(trainer)
        loss, _ = trainer._forward(batch, trainer._denominators(batch))
        loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in trainer.draft.parameters() if p.grad is not None)
        trainer.optimizer.step()
        state = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                    for key, t in s.items() if key != "step")
        return grads + state

    trained = step_bytes(built(tiny_llama, hs_data, tmp_path / "a"))
    frozen_trainer = built(tiny_llama, hs_data, tmp_path / "b", freeze_lm_head=True)
    frozen = step_bytes(frozen_trainer)
    v, h = frozen_trainer.draft.lm_head.weight.shape
    dims = read_verifier_dims(str(tiny_llama))
    est = [estimate_train_memory(dims, total_seq_len=64, ttt_steps=3, draft_vocab_size=v, freeze_lm_head=f).total
           for f in (False, True)]
    assert trained - frozen == est[0] - est[1] == 12 * v * h


def test_flag_and_settings_files_reach_the_config(tmp_path):
    import argparse

    from speculators.config.files import add_config_option, parse_args
    from speculators.train.cli import add_train_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    add_config_option(p)
    assert config_from_args(p.parse_args(["--verifier-name-or-path", "m"])).freeze_lm_head is False
    assert config_from_args(p.parse_args(["--verifier-name-or-path", "m", "--freeze-lm-head"])).freeze_lm_head is True
    (tmp_path / "t.yaml").write_text("verifier_name_or_path: m\nfreeze-lm-head: true\n")
    assert config_from_args(parse_args(p, ["--config", str(tmp_path / "t.yaml")])).freeze_lm_head is True
    (tmp_path / "t.json").write_text(json.dumps({"verifier_name_or_path": "m", "freeze_lm_head": "yes please"}))
    with pytest.raises(UserError, match="freeze"):
        config_from_args(parse_args(p, ["--config", str(tmp_path / "t.json")]))


def test_a_save_path_keeps_its_choice(tmp_path):
    """The optimizer state saved with a trained head does not fit a frozen one: resuming with
    the other choice is refused, also for a run recorded before the flag existed (it trained it)."""
    args = {"verifier_name_or_path": "m", "freeze_lm_head": False}
    for name, recorded in (("new", args), ("old", {"verifier_name_or_path": "m"})):
        save = tmp_path / name
        ckpt.write_run(save, "r1", recorded)
        with pytest.raises(UserError, match="freeze_lm_head: False there vs True now"):
            ckpt.claim_save_path(save, {**args, "freeze_lm_head": True}, resume=True)
        assert ckpt.claim_save_path(save, args, resume=True)[0] == "r1"


@pytest.mark.slow
def test_two_process_fsdp_keeps_the_frozen_head_and_matches_one_process(tiny_llama, hs_data, tmp_path):
    """FSDP2 shards a frozen lm_head beside trained tensors: the same losses as one process, and
    the gathered checkpoint holds the verifier's rows unchanged."""
    common = ["--verifier-name-or-path", str(tiny_llama), "--data-path", str(hs_data), "--epochs", "1",
              "--lr", "1e-2", "--total-seq-len", "64", "--ttt-steps", "2", "--log-freq", "1000",
              "--train-data-ratio", "0.75", "--max-steps", "2", "--freeze-lm-head"]
    dist = run_train_cli([*common, "--save-path", str(tmp_path / "dist")], nproc=2)
    assert dist.returncode == 0, dist.stderr[-3000:]
    single = run_train_cli([*common, "--batches-per-step", "2", "--save-path", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    from tests.support.train_helpers import train_losses

    d, s = train_losses(tmp_path / "dist"), train_losses(tmp_path / "one")
    assert d.keys() == s.keys() and d
    for step in d:
        assert d[step] == pytest.approx(s[step], rel=1e-4)
    dist_ckpt = load_file(str(ckpt.latest_checkpoint(tmp_path / "dist") / ckpt.MODEL_FILE))
    one_ckpt = load_file(str(ckpt.latest_checkpoint(tmp_path / "one") / ckpt.MODEL_FILE))
    from speculators.models.eagle3 import Eagle3DraftModel

    rows = verifier_rows(tiny_llama, Eagle3DraftModel.from_pretrained(ckpt.latest_checkpoint(tmp_path / "dist")).t2d)
    assert torch.equal(dist_ckpt["lm_head.weight"], rows) and torch.equal(one_ckpt["lm_head.weight"], rows)
    torch.testing.assert_close(dist_ckpt["fc.weight"], one_ckpt["fc.weight"], rtol=1e-4, atol=1e-6)
