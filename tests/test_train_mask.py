"""TTT mask rule, loss alignment and the attention kernels that implement the mask."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from speculators.models.eagle3.attention import ttt_attention_flex, ttt_attention_sdpa
from speculators.models.eagle3.ttt_mask import (
    context_mask,
    shift_tokens,
    step_valid_positions,
    ttt_mask_dense,
    ttt_mask_mod,
)

DOCS = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]])


def brute_force_allowed(docs: torch.Tensor, step: int, b: int, q: int, kv: int) -> bool:
    """The rule written out literally, one query/key pair at a time."""
    t = docs.shape[1]
    block, pos = divmod(kv, t)
    if pos == q:
        return True  # own position: step-0 key and every earlier step's key
    if block > 0:
        return False
    return bool(docs[b, q] != -1 and pos <= q and docs[b, q] == docs[b, pos])


@pytest.mark.parametrize("step", [0, 1, 2])
def test_dense_mask_matches_rule(step):
    dense = ttt_mask_dense(DOCS, step)
    b, t, _ = dense.shape
    assert dense.shape == (2, 6, 6 * (step + 1))
    for bi, q, kv in itertools.product(range(b), range(t), range(t * (step + 1))):
        assert bool(dense[bi, q, kv]) == brute_force_allowed(DOCS, step, bi, q, kv), (bi, q, kv)


def test_context_mask_blocks_other_documents_and_padding():
    m = context_mask(DOCS)
    assert m[0, 4, 3] and not m[0, 3, 2]  # doc 1 sees itself, not doc 0
    assert not m[0, 2, 3]  # causal
    assert m[0, 5].tolist() == [False] * 5 + [True]  # padding sees only itself


@pytest.mark.parametrize("step", [0, 2])
def test_mask_mod_matches_dense(step):
    t = DOCS.shape[1]
    mod = ttt_mask_mod(DOCS, t)
    dense = ttt_mask_dense(DOCS, step)
    q = torch.arange(t)[:, None]
    kv = torch.arange(t * (step + 1))[None, :]
    for bi in range(DOCS.shape[0]):
        got = mod(torch.tensor(bi), torch.tensor(0), q, kv)
        assert torch.equal(got, dense[bi])


def test_step_valid_positions_respects_shift_mask_and_documents():
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    assert step_valid_positions(loss_mask, DOCS, 0).tolist() == [
        [False, True, True, True, True, False],
        [True, True, True, True, False, False],
    ]
    # step 1 at i predicts target i+1: must be loss-masked and in i's document
    assert step_valid_positions(loss_mask, DOCS, 1).tolist() == [
        [True, True, False, True, False, False],
        [True, True, True, False, False, False],
    ]
    assert not step_valid_positions(loss_mask, DOCS, 6).any()


def test_shift_tokens():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert shift_tokens(ids, 0).tolist() == [[5, 6, 7, 8]]
    assert shift_tokens(ids, 2).tolist() == [[7, 8, 0, 0]]


def _reference_attention(q, keys, values, docs, scale):
    """Plain softmax attention over all concatenated keys with the dense reference mask."""
    step = len(keys) - 1
    k = torch.cat(keys, 2).repeat_interleave(q.shape[1] // keys[0].shape[1], 1)
    v = torch.cat(values, 2).repeat_interleave(q.shape[1] // keys[0].shape[1], 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~ttt_mask_dense(docs, step)[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("steps", [1, 3])
def test_sdpa_ttt_attention_matches_reference(steps):
    torch.manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 6, 8
    q = torch.randn(b, h, t, d)
    keys = [torch.randn(b, hkv, t, d) for _ in range(steps)]
    values = [torch.randn(b, hkv, t, d) for _ in range(steps)]
    got = ttt_attention_sdpa(q, keys, values, context_mask(DOCS), d**-0.5)
    want = _reference_attention(q, keys, values, DOCS, d**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flex_attention_path_matches_sdpa_on_cpu():
    torch.manual_seed(1)
    b, h, hkv, t, d = 2, 4, 2, 6, 8
    q = torch.randn(b, h, t, d)
    keys = [torch.randn(b, hkv, t, d) for _ in range(3)]
    values = [torch.randn(b, hkv, t, d) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ttt_attention_flex(q, keys, values, DOCS, d**-0.5, compile=False)
    want = ttt_attention_sdpa(q, keys, values, context_mask(DOCS), d**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
