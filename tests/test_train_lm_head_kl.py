"""The three lm_head + KL implementations agree, and keep what they promise for backward."""

import math

import pytest
import torch
from torch import nn

from speculators.errors import UserError
from speculators.config.train import TrainConfig
from speculators.train.lm_head_kl import LOSS_IMPLS, lm_head_kl

from tests.support.train_helpers import train_losses_of

N, H, V, M = 37, 16, 50, 61  # M != N: the target table is not mistaken for an [N, V] tensor


def _case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype)
    head = nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype))
    target = torch.log_softmax(torch.randn(M, V, generator=g, dtype=dtype) * 3, dim=-1)
    rows = torch.randperm(M, generator=g)[:N]
    return h, head, target, rows


WEIGHT, UPSTREAM = 0.37, 2.5  # the step weight, and a loss scale reaching backward


def _run(impl, h, head, target, rows, chunk=8):
    head.zero_grad()
    h = h.clone().requires_grad_(True)
    loss, kl, pred = lm_head_kl(h, head, target, rows, WEIGHT, impl, chunk_rows=chunk)
    assert not kl.requires_grad and not pred.requires_grad
    (loss * UPSTREAM).backward()
    return loss.detach(), kl, pred, h.grad, head.weight.grad.clone()


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_matches_eager_values_argmax_and_gradients(impl, chunk):
    case = _case()
    ref = _run("eager", *case)
    got = _run(impl, *case, chunk=chunk)
    assert torch.allclose(got[0], ref[0], rtol=1e-5)
    assert torch.allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], ref[2])
    assert torch.allclose(got[3], ref[3], rtol=1e-4, atol=1e-6)
    assert torch.allclose(got[4], ref[4], rtol=1e-4, atol=1e-6)
    assert ref[3].abs().sum() > 0 and ref[4].abs().sum() > 0


def test_kl_is_the_definition():
    h, head, target, rows = _case(torch.float64)
    p = target[rows].exp()
    expected = (p * (target[rows] - torch.log_softmax(head(h), -1))).sum(-1)
    for impl in LOSS_IMPLS:
        loss, kl, _ = lm_head_kl(h, head, target, rows, WEIGHT, impl)
        assert torch.allclose(kl.double(), expected, rtol=1e-5), impl
        assert torch.allclose(loss.double(), WEIGHT * expected.sum(), rtol=1e-5), impl


def test_per_row_weights_match_eager():
    """The objective passes every TTT step's rows in one call, each with its step's weight."""
    h, head, target, rows = _case()
    weights = torch.rand(N, generator=torch.Generator().manual_seed(1))
    got = {}
    for impl in LOSS_IMPLS:
        head.zero_grad()
        x = h.clone().requires_grad_(True)
        loss, kl, _ = lm_head_kl(x, head, target, rows, weights, impl, chunk_rows=8)
        assert torch.allclose(loss.detach(), (weights * kl).sum(), rtol=1e-6)
        loss.backward()
        got[impl] = (x.grad, head.weight.grad.clone())
    for impl in ("fused", "chunked"):
        assert torch.allclose(got[impl][0], got["eager"][0], rtol=1e-4, atol=1e-6)
        assert torch.allclose(got[impl][1], got["eager"][1], rtol=1e-4, atol=1e-6)


def test_no_rows_gives_zero_loss_and_zero_gradients():
    h, head, target, _ = _case()
    rows = torch.zeros(0, dtype=torch.long)
    for impl in LOSS_IMPLS:
        head.zero_grad()
        x = h[:0].clone().requires_grad_(True)
        loss, kl, pred = lm_head_kl(x, head, target, rows, WEIGHT, impl)
        assert kl.shape == (0,) and pred.shape == (0,) and float(loss.detach()) == 0.0
        loss.backward()
        assert head.weight.grad is None or not head.weight.grad.any()


def _saved_nv_tensors(impl, autocast=False, grad=True):
    """Bytes autograd keeps in `[N, V]`-sized tensors between forward and backward."""
    h, head, target, rows = _case()
    h.requires_grad_(True)
    kept = []

    def pack(t):
        if t.numel() == N * V:
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(grad):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _, _ = lm_head_kl(h, head, target, rows, WEIGHT, impl)
    if grad:
        loss.backward()
    return kept


def test_memory_kept_for_backward():
    eager, fused, chunked = (_saved_nv_tensors(i) for i in ("eager", "fused", "chunked"))
    assert fused == [N * V * 4]  # its gradient, in the logits' float32
    assert sum(eager) >= 2 * N * V * 4  # log-probs, the gathered target, ...
    assert chunked == []
    assert _saved_nv_tensors("fused", autocast=True) == [N * V * 2]  # bf16 under autocast
    assert _saved_nv_tensors("fused", grad=False) == []  # validation makes no gradient


def test_fused_under_no_grad_gives_the_same_values():
    h, head, target, rows = _case()
    loss, kl, pred = lm_head_kl(h, head, target, rows, WEIGHT, "fused")
    with torch.no_grad():
        loss2, kl2, pred2 = lm_head_kl(h, head, target, rows, WEIGHT, "fused")
    assert torch.equal(kl, kl2) and torch.equal(pred, pred2) and torch.equal(loss.detach(), loss2)


def test_bf16_autocast_close_to_eager():
    case = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run("eager", *case)
        fused = _run("fused", *case)
        chunked = _run("chunked", *case)
    # fused sees the very same bf16 logits as eager: the KL (float32 math) must agree closely
    assert torch.allclose(fused[1], ref[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(fused[2], ref[2])
    for got in (fused, chunked):  # gradients pass through bf16 matmuls
        assert torch.allclose(got[3], ref[3], rtol=5e-2, atol=5e-2)
        assert torch.allclose(got[4], ref[4], rtol=5e-2, atol=5e-2)
    assert torch.allclose(chunked[1], ref[1], rtol=2e-2, atol=1e-2)  # its own bf16 matmul, in chunks


def test_unknown_impl_is_refused():
    h, head, target, rows = _case()
    with pytest.raises(ValueError, match="loss implementation 'triton'"):
        lm_head_kl(h, head, target, rows, 1.0, "triton")


def test_trainer_names_the_bad_flag(tiny_llama, tmp_path):
    # the typed config refuses bad values when it is built, naming the flag
    with pytest.raises(UserError, match="--loss-impl choose one of fused, chunked, eager .got 'triton'"):
        TrainConfig(verifier_name_or_path=str(tiny_llama), save_path=str(tmp_path / "s"), loss_impl="triton")
    with pytest.raises(UserError, match="--loss-chunk-rows must be a whole number >= 0 .got -1"):
        TrainConfig(verifier_name_or_path=str(tiny_llama), save_path=str(tmp_path / "s"), loss_chunk_rows=-1)


def test_training_curves_agree_across_impls(tiny_llama, hs_data, tmp_path):
    curves = {impl: train_losses_of(tiny_llama, hs_data, tmp_path / impl, loss_impl=impl, loss_chunk_rows=16)
              for impl in LOSS_IMPLS}
    ref = curves["eager"]
    assert len(ref) > 2 and ref[max(ref)] < ref[min(ref)]
    for impl in ("fused", "chunked"):
        assert curves[impl].keys() == ref.keys()
        for step in ref:
            assert math.isclose(curves[impl][step], ref[step], rel_tol=1e-4), (impl, step)


def test_auto_chunk_rows():
    from speculators.train.lm_head_kl import auto_chunk_rows

    assert auto_chunk_rows(8192, "cpu") == 128 and auto_chunk_rows(32000, "cpu") == 32
    assert auto_chunk_rows(32000, "cuda") == 1048
    assert auto_chunk_rows(10**9, "cpu") == 1  # never zero
