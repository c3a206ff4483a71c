"""The TTT unroll restricted to counted positions (`ttt_query_rows`) equals the dense unroll.

The reference is a brute-force dense TTT loop written here from the rule in `ttt_mask`
(every position at every step, one explicit `[T, T * (s + 1)]` mask built by Python loops,
plain softmax attention): loss per step, KL, agreement and every gradient must match it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.models.eagle3.ttt_mask import compact_index, step_valid_positions, ttt_query_rows
from speculators.train.losses import summarize
from speculators.train.objective import TTTObjective, counted_positions
from speculators.train.verifier import VerifierHead

H, T = 32, 24


def _config(num_layers=1, window=None, **kw) -> Eagle3Config:
    extra = {}
    if window:
        extra = dict(layer_types=["sliding_attention"] * num_layers, sliding_window=window)
    return Eagle3Config(hidden_size=H, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, vocab_size=50, draft_vocab_size=20, num_layers=num_layers, **extra, **kw)


def _batch(b=2, seed=0):
    """Packed rows: several documents, prompt (unmasked) spans, padding at the end of row 0."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.full((b, T), -1, dtype=torch.long)
    mask = torch.zeros(b, T, dtype=torch.long)
    pos = torch.zeros(b, T, dtype=torch.long)
    layouts = [[(0, 9, 4), (9, 18, 13)], [(0, 7, 6), (7, 15, 9), (15, 24, 16)]]
    for r in range(b):
        for d, (a, e, m) in enumerate(layouts[r % 2]):
            docs[r, a:e] = d
            mask[r, m:e] = 1
            pos[r, a:e] = torch.arange(e - a)
    return {
        "hidden_states": torch.randn(b, T, 3 * H, generator=g, dtype=torch.float64),
        "verifier_last_hidden_states": torch.randn(b, T, H, generator=g, dtype=torch.float64),
        "input_ids": torch.randint(0, 50, (b, T), generator=g),
        "document_ids": docs, "loss_mask": mask, "position_ids": pos,
    }


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None, :, None].double() * inv  # [B, 1, T, d/2]
    ang = torch.cat([ang, ang], dim=-1)
    a, c = x.chunk(2, dim=-1)
    return x * ang.cos() + torch.cat([-c, a], dim=-1) * ang.sin()


def _allowed(docs, b, i, j, key_step, query_step, window):
    """The TTT rule for one (query, key) pair, from the ttt_mask docstring."""
    if key_step > 0:
        return i == j
    if i == j:
        return True
    ok = j <= i and docs[b, i] == docs[b, j] and docs[b, i] != -1
    if window is not None:
        ok = ok and i - j < window - query_step
    return bool(ok)


def reference_unroll(model, batch, steps):
    """Brute force: every position, every step, dense masked softmax attention."""
    cfg = model.config
    docs, ids, pos = batch["document_ids"], batch["input_ids"], batch["position_ids"]
    b, t = ids.shape
    theta = cfg.rope_parameters.get("rope_theta", 10000.0)
    hidden = model.fc(batch["hidden_states"])
    keys = [[] for _ in model.layers]
    values = [[] for _ in model.layers]
    outs = []
    for s in range(steps):
        shifted = torch.cat([ids[:, s:], torch.zeros(b, s, dtype=torch.long)], dim=1)
        emb = model.embed_tokens.weight[shifted]
        for li, layer in enumerate(model.layers):
            window = cfg.layer_window(li)
            if li == 0:
                normed = layer.hidden_norm(hidden)
                residual = normed if cfg.norm_before_residual else hidden
                x = torch.cat([layer.input_layernorm(emb), normed], dim=-1)
            else:
                residual, x = hidden, layer.input_layernorm(hidden)
            att = layer.self_attn
            nh, nkv, hd = att.num_heads, att.num_kv, att.head_dim
            q, k = att.q_proj(x).view(b, t, nh, hd), att.k_proj(x).view(b, t, nkv, hd)
            if att.qk_norm:
                q, k = att.q_norm(q), att.k_norm(k)
            q = _rope(q.transpose(1, 2), pos + s, theta)
            k = _rope(k.transpose(1, 2), pos + s, theta)
            v = att.v_proj(x).view(b, t, nkv, hd).transpose(1, 2)
            keys[li].append(k)
            values[li].append(v)
            kk = torch.cat(keys[li], dim=2).repeat_interleave(nh // nkv, dim=1)
            vv = torch.cat(values[li], dim=2).repeat_interleave(nh // nkv, dim=1)
            allowed = torch.tensor([[[_allowed(docs, r, i, j % t, j // t, s, window) for j in range(t * (s + 1))]
                                     for i in range(t)] for r in range(b)])
            scores = (q @ kk.transpose(-1, -2)) / math.sqrt(hd)
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            out = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(b, t, nh * hd)
            hidden = residual + att.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        normed = model.norm(hidden)
        if cfg.norm_output:
            hidden = normed
        outs.append(normed)
    return outs


def reference_loss(model, head, batch, steps, decay):
    """Per-step KL sums / counts / agreement over counted positions, and the weighted loss."""
    outs = reference_unroll(model, batch, steps)
    b, t = batch["input_ids"].shape
    with torch.no_grad():
        # float32 like the trainer's targets (the verifier head computes in float32)
        tgt = F.log_softmax(head(batch["verifier_last_hidden_states"].flatten(0, 1)).float(), -1).double()
    loss = 0.0
    per_step = []
    for k, normed in enumerate(outs):
        idx = step_valid_positions(batch["loss_mask"], batch["document_ids"], k).flatten().nonzero().squeeze(1)
        logq = F.log_softmax(model.lm_head(normed.flatten(0, 1)[idx]), -1)
        p = tgt[idx + k]
        kl = (p.exp() * (p - logq)).sum(-1)
        loss = loss + decay**k * kl.sum() / max(1, idx.numel())
        per_step.append((kl.detach().sum(), idx.numel(), int((logq.argmax(-1) == p.argmax(-1)).sum())))
    return loss, per_step


def _run_objective(model, head, batch, steps, decay, skip, precomputed):
    obj = TTTObjective(model, head, "fused", 0, skip_uncounted=skip)
    b = dict(batch)
    if precomputed:
        b.update(counted_positions(b["loss_mask"], b["document_ids"], steps))
    den = torch.stack([step_valid_positions(b["loss_mask"], b["document_ids"], k).sum() for k in range(steps)]).double()
    model.zero_grad(set_to_none=True)
    loss, stats = obj(b, steps, decay, den)
    loss.backward()
    return loss.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=2, window=8),
    dict(num_layers=1, draft_arch="qwen3", norm_output=True),
]


def _assert_matches_reference(model, head, batch, steps, decay, loss, stats, grads):
    """The objective's loss, per-step (KL sum, count, correct) and every gradient equal the
    brute-force dense loop's (`reference_loss`, run here on the same model)."""
    model.zero_grad(set_to_none=True)
    ref_loss, per_step = reference_loss(model, head, batch, steps, decay)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # (the objective rounds the step weights 1/count to float32: 1e-8 relative)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=1e-9)
    for k, (kl_sum, count, correct) in enumerate(per_step):
        torch.testing.assert_close(stats[k, 0].double(), kl_sum, rtol=1e-5, atol=1e-6)
        assert int(stats[k, 1]) == count and int(stats[k, 2]) == correct
    assert set(grads) == set(ref_grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-6 * float(ref_grads[n].abs().max()),
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("precomputed", [False, True], ids=["objective-rows", "loader-rows"])
def test_sparse_unroll_matches_brute_force_dense(case, steps, precomputed):
    torch.manual_seed(1)
    model = Eagle3DraftModel(_config(**case)).double()
    model.attn_impl = "sdpa"
    head = VerifierHead(torch.ones(H), torch.randn(20, H), 1e-6).double()
    batch = _batch()
    decay = 0.8
    assert ttt_query_rows(batch["loss_mask"], batch["document_ids"], steps) is not None  # something is skipped

    loss, stats, grads = _run_objective(model, head, batch, steps, decay, True, precomputed)
    _assert_matches_reference(model, head, batch, steps, decay, loss, stats, grads)

    # against the dense objective (same float32 weights): equal to float64 rounding, and the
    # chain metrics (full / conditional accuracy) exactly
    dense_loss, dense_stats, dense_grads = _run_objective(model, head, batch, steps, decay, False, precomputed)
    torch.testing.assert_close(loss, dense_loss, rtol=1e-12, atol=1e-13)
    for n in grads:
        torch.testing.assert_close(grads[n], dense_grads[n], rtol=1e-10, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")
    assert summarize(stats, decay).keys() == summarize(dense_stats, decay).keys()
    assert torch.equal(stats[:, 1:], dense_stats[:, 1:])


@pytest.fixture
def flex_calls(monkeypatch):
    """Eager flex attention on the CPU with its backward, recording each call's (queries, keys).

    torch refuses CPU inputs that need grad ("FlexAttention does not support backward on CPU")
    before dispatch; the eager kernel itself has a (math) backward, which these tests use."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)
    calls, real = [], fa.flex_attention

    def spy(q, k, v, *args, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(fa, "flex_attention", spy)
    return calls


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("case", CASES[1:3], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_sparse_flex_unroll_matches_brute_force_dense(case, steps, flex_calls):
    """The flex path (eager kernel) runs only the kept query rows and equals the dense reference."""
    import warnings

    torch.manual_seed(4)
    model = Eagle3DraftModel(_config(**case)).double()
    model.attn_impl = "flex_eager"
    head = VerifierHead(torch.ones(H), torch.randn(20, H), 1e-6).double()
    batch = _batch(seed=5)
    decay = 0.7
    rows = ttt_query_rows(batch["loss_mask"], batch["document_ids"], steps)
    n = rows.shape[1]
    assert n < T and (rows == -1).any()  # something is skipped, and some row is padded

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, stats, grads = _run_objective(model, head, batch, steps, decay, True, False)
    # flex ran every step-0 layer but the last on all T queries, every other call on the N kept
    # rows, against the T step-0 keys plus N keys per later step
    layers = len(model.layers)
    want = [(T, T)] * (layers - 1) + [(n, T)] + [(n, T + s * n) for s in range(1, steps) for _ in range(layers)]
    assert flex_calls == want

    _assert_matches_reference(model, head, batch, steps, decay, loss, stats, grads)


def test_flex_attention_on_kept_rows_matches_sdpa_rows():
    """One call: flex over `N` kept query rows (padded, windowed) equals the SDPA compact form."""
    import warnings

    from speculators.models.eagle3.attention import ttt_attention_flex, ttt_attention_sdpa, windowed
    from speculators.models.eagle3.model import gather_rows
    from speculators.models.eagle3.ttt_mask import context_mask

    torch.manual_seed(6)
    batch = _batch(seed=7)
    docs = batch["document_ids"]
    rows = ttt_query_rows(batch["loss_mask"], docs, 3)
    b, n = rows.shape
    q = torch.randn(b, 4, n, 8, dtype=torch.float64)
    keys = [torch.randn(b, 2, T, 8, dtype=torch.float64)] + [torch.randn(b, 2, n, 8, dtype=torch.float64) for _ in range(2)]
    values = [torch.randn_like(k) for k in keys]
    for window in (None, 5):
        want = ttt_attention_sdpa(q, keys, values, gather_rows(windowed(context_mask(docs), window), rows), 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = ttt_attention_flex(q, keys, values, docs, 0.3, compile=False, window=window, query_pos=rows)
        # (the eager flex kernel rounds at about 1e-7 even in float64; a wrong mask entry is O(1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query_pos"):
        ttt_attention_flex(q, keys, values, docs, 0.3, compile=False)
    # the compiled kernel (inductor's CPU flex template, static shapes here) takes the same mask
    q32, k32, v32 = q.float(), [k.float() for k in keys], [v.float() for v in values]
    got = ttt_attention_flex(q32, k32, v32, docs, 0.3, compile=True, window=5, query_pos=rows)
    want = ttt_attention_sdpa(q32, k32, v32, gather_rows(windowed(context_mask(docs), 5), rows), 0.3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_query_rows_are_the_union_of_counted_starts_padded():
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1, -1]])
    mask = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0, 0]])
    rows = ttt_query_rows(mask, docs, 2)
    # row 0: step 0 counts 2, 3, 7; step 1 counts 1, 2, 6 -> {1, 2, 3, 6, 7}; row 1: {3, 4}
    assert rows.tolist() == [[1, 2, 3, 6, 7], [3, 4, -1, -1, -1]]
    inv = compact_index(rows, 8)
    assert inv.view(2, 8).tolist() == [[-1, 0, 1, 2, -1, -1, 3, 4], [-1, -1, -1, 5, 6, -1, -1, -1]]
    assert ttt_query_rows(torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long), 1) is None


def test_flex_block_mask_cache_keeps_a_full_width_compact_call_apart_from_the_dense_one():
    """A batch whose widest row keeps every position has N == T kept rows, yet the other row's
    rows are not the identity: the compact call must not reuse the dense call's block mask."""
    import warnings

    from speculators.models.eagle3.attention import ttt_attention_flex, ttt_attention_sdpa
    from speculators.models.eagle3.model import gather_rows
    from speculators.models.eagle3.ttt_mask import context_mask

    torch.manual_seed(8)
    t = 8
    docs = torch.tensor([[0] * t, [0, 0, 0, 1, 1, 1, -1, -1]])
    rows = torch.tensor([list(range(t)), [1, 2, 4, 5, -1, -1, -1, -1]])
    q = torch.randn(2, 2, t, 8, dtype=torch.float64)
    keys = [torch.randn(2, 2, t, 8, dtype=torch.float64) for _ in range(2)]
    values = [torch.randn_like(k) for k in keys]
    cache: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ttt_attention_flex(q, keys, values, docs, 0.3, cache, compile=False)  # the dense call first
        got = ttt_attention_flex(q, keys, values, docs, 0.3, cache, compile=False, query_pos=rows)
    want = ttt_attention_sdpa(q, keys, values, gather_rows(context_mask(docs), rows), 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
