"""Training options of issue 21: --loss, --optimizer muon, --gradient-checkpointing.

Every loss is checked against a brute-force computation from the two softmaxes, its
gradients against autograd (gradcheck in float64; LK against autograd with its weight
detached), gradient checkpointing against the plain backward, Muon+AdamW against torch's own
optimizers stepped separately, and the flags through `python -m speculators.train`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.train.divergences import LOSSES
from speculators.train.lm_head_kl import lm_head_kl
from speculators.train.optimizers import OptimizerChain, split_for_muon

from tests.support.synthetic import write_synthetic_hidden_states
from tests.support.train_helpers import run_train_cli, train_losses

N, H, V, M = 9, 6, 7, 11
ETA = 3.0


def _case(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype)
    head = nn.Linear(H, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=dtype))
    target = torch.log_softmax(torch.randn(M, V, generator=g, dtype=dtype) * 2, dim=-1)
    rows = torch.randperm(M, generator=g)[:N]
    return h, head, target, rows


def _brute(loss: str, p: list[float], q: list[float]) -> float:
    """One row's loss from the two distributions, element by element (the definitions)."""
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)
    kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q) if b > 0)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    jsd = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0) + \
        0.5 * sum(b * math.log(b / c) for b, c in zip(q, m) if b > 0)
    tv = 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    alpha = sum(min(a, b) for a, b in zip(p, q))
    lam = math.exp(-ETA * alpha)
    return {"kl": kl_pq, "reverse_kl": kl_qp, "jsd": jsd, "tv": tv, "lk": lam * kl_pq + (1 - lam) * tv}[loss]


@pytest.mark.parametrize("impl", ["fused", "chunked", "eager"])
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_values_match_the_definition(loss, impl):
    h, head, target, rows = _case()
    weight = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    total, per_row, pred = lm_head_kl(h, head, target, rows, weight, impl, chunk_rows=4, loss=loss, eta=ETA)
    with torch.no_grad():
        q_all = torch.softmax(head(h), -1).tolist()
    p_all = target[rows].exp().tolist()
    expected = [_brute(loss, p, q) for p, q in zip(p_all, q_all)]
    assert per_row.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert float(total.detach()) == pytest.approx(sum(w * e for w, e in zip(weight.tolist(), expected)), rel=1e-9)
    assert torch.equal(pred, head(h).argmax(-1))


@pytest.mark.parametrize("impl", ["fused", "chunked", "eager"])
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd", "tv"])
def test_gradients_pass_gradcheck(loss, impl):
    h, head, target, rows = _case(seed=2)
    w = head.weight.detach().clone().requires_grad_(True)
    weight = torch.linspace(0.5, 1.5, N, dtype=torch.float64)

    def f(hidden, matrix):
        return lm_head_kl(hidden, _Head(matrix), target, rows, weight, impl, 3, loss)[0]

    assert torch.autograd.gradcheck(f, (h.clone().requires_grad_(True), w), eps=1e-6, atol=1e-6)


class _Head(nn.Module):
    """An lm_head whose weight is a given (differentiable) tensor."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.t()


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_lk_gradient_is_autograd_with_the_weight_detached(impl):
    h, head, target, rows = _case(seed=3)
    h1 = h.clone().requires_grad_(True)
    head.zero_grad()
    lm_head_kl(h1, head, target, rows, 0.7, impl, 4, "lk", ETA)[0].backward()
    got_h, got_w = h1.grad, head.weight.grad.clone()
    # reference: the formula written out, lam = exp(-eta * sum min(p, q)) with its gradient stopped
    h2 = h.clone().requires_grad_(True)
    w2 = head.weight.detach().clone().requires_grad_(True)
    q = torch.softmax(h2 @ w2.t(), -1)
    p = target[rows].exp()
    lam = torch.exp(-ETA * torch.minimum(p, q).sum(-1)).detach()
    kl = (p * (p.log() - q.log())).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    (0.7 * (lam * kl + (1 - lam) * tv)).sum().backward()
    torch.testing.assert_close(got_h, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_w, w2.grad, rtol=1e-9, atol=1e-12)


def test_float32_fused_matches_eager_for_every_loss():
    h, head, target, rows = _case(seed=4, dtype=torch.float32)
    for loss in LOSSES:
        grads = []
        for impl in ("eager", "fused", "chunked"):
            head.zero_grad()
            x = h.clone().requires_grad_(True)
            lm_head_kl(x, head, target, rows, 1.0, impl, 4, loss)[0].backward()
            grads.append((x.grad, head.weight.grad.clone()))
        for g in grads[1:]:
            torch.testing.assert_close(g[0], grads[0][0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g[1], grads[0][1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ gradient checkpointing
def _draft(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = Eagle3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       vocab_size=50, draft_vocab_size=20, num_layers=2, verifier_name_or_path="/v",
                       verifier_architectures=["LlamaForCausalLM"], **kw)
    return Eagle3DraftModel(cfg)


@pytest.mark.parametrize("kw", [{}, {"norm_output": True, "sliding_window": 5}])
def test_gradient_checkpointing_gives_the_same_gradients(kw):
    g = torch.Generator().manual_seed(0)
    hs, ids = torch.randn(2, 12, 96, generator=g), torch.randint(0, 50, (2, 12), generator=g)
    pos = torch.arange(1, 13).expand(2, 12)
    docs = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    grads = []
    for ckpt in (False, True):
        model = _draft(**kw)
        model.gradient_checkpointing = ckpt
        out = model(hs, ids, docs, pos, ttt_steps=3)
        sum((k + 1) * (o.log_softmax(-1)[..., :3]).sum() for k, o in enumerate(out)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_recomputes_the_layers():
    calls = {"n": 0}
    model = _draft()
    model.gradient_checkpointing = True
    mlp_forward = model.layers[1].mlp.forward

    def counted(x):
        calls["n"] += 1
        return mlp_forward(x)

    model.layers[1].mlp.forward = counted  # (module hooks do not fire in checkpoint's recompute)
    hs, ids = torch.randn(1, 6, 96), torch.randint(0, 50, (1, 6))
    out = model(hs, ids, torch.zeros(1, 6, dtype=torch.long), torch.arange(1, 7)[None], ttt_steps=2)
    assert calls["n"] == 2
    sum(o.sum() for o in out).backward()
    assert calls["n"] == 4  # each step's layer ran again in backward


def test_gradient_checkpointing_keeps_less_for_backward():
    hs, ids = torch.randn(1, 32, 96), torch.randint(0, 50, (1, 32))
    kept = {}
    for ckpt in (False, True):
        model = _draft()
        model.gradient_checkpointing = ckpt
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(hs, ids, torch.zeros(1, 32, dtype=torch.long), torch.arange(1, 33)[None], ttt_steps=3)
        kept[ckpt] = total[0]
    assert kept[True] < 0.5 * kept[False], kept


# ------------------------------------------------------------------ Muon
def test_muon_split_keeps_vocab_matrices_and_vectors_on_adamw():
    model = _draft()
    named = list(model.named_parameters())
    muon, adamw = split_for_muon(named)
    names = {id(p): n for n, p in named}
    on_muon, on_adamw = {names[id(p)] for p in muon}, {names[id(p)] for p in adamw}
    assert on_adamw == {n for n, p in named if p.requires_grad and (p.ndim != 2 or n == "lm_head.weight")}
    assert "fc.weight" in on_muon and "layers.1.mlp.down_proj.weight" in on_muon
    assert "embed_tokens.weight" not in on_muon | on_adamw  # frozen


def _step_models(chain_factory, steps=3):
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 4))
    opt = chain_factory(model)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    return model, opt


def _muon_adamw(model):
    mats = [model[0].weight, model[2].weight]
    rest = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    return (torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.01),
            torch.optim.Muon(mats, lr=1e-2, weight_decay=0.01, adjust_lr_fn="match_rms_adamw"))


def test_optimizer_chain_steps_like_torch_muon_and_adamw():
    ref, _ = _step_models(lambda m: _Both(_muon_adamw(m)))
    got, chain = _step_models(lambda m: OptimizerChain(list(_muon_adamw(m))))
    for a, b in zip(ref.parameters(), got.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(chain.param_groups) == 2 and len(chain.state) == 6
    # a state_dict round trip keeps stepping the same way (momentum buffers, Adam moments)
    torch.manual_seed(1)
    sd = copy.deepcopy(chain.state_dict())  # (a state_dict holds the live tensors; a checkpoint is a copy)
    model2 = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 4))
    model2.load_state_dict(got.state_dict())
    chain2 = OptimizerChain(list(_muon_adamw(model2)))
    chain2.load_state_dict(sd)
    for g in chain2.param_groups:
        g["lr"] *= 0.5  # the schedule acts through the chain's groups on the inner optimizers
    for g in chain.param_groups:
        g["lr"] *= 0.5
    x = torch.randn(16, 8)
    for m, o in ((got, chain), (model2, chain2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(got.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert chain2.optimizers[1].param_groups[0]["lr"] == pytest.approx(5e-3)


class _Both:
    def __init__(self, opts):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad()

    def step(self):
        for o in self.opts:
            o.step()


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def hs_tiny(tiny_llama, tmp_path_factory):
    return write_synthetic_hidden_states(tiny_llama, tmp_path_factory.mktemp("hs_opts"), num_samples=6, seq_len=24)


def test_options_through_the_cli_train_and_resume(tiny_llama, hs_tiny, tmp_path):
    save = tmp_path / "run"
    args = ["--verifier-name-or-path", str(tiny_llama), "--data-path", str(hs_tiny), "--total-seq-len", "64",
            "--ttt-steps", "2", "--lr", "3e-3", "--warmup-steps", "1", "--log-freq", "1000", "--eval-prompts", "0",
            "--optimizer", "muon", "--loss", "lk", "--gradient-checkpointing", "--save-path", str(save)]
    run = run_train_cli([*args, "--epochs", "1"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Muon over" in run.stderr + run.stdout
    first = train_losses(save)
    assert first and all(math.isfinite(v) for v in first.values())
    opt_state = torch.load(next(save.glob("checkpoint_*/optimizer_state_dict.pt")), weights_only=False)
    buffers = [s for s in opt_state["state"].values() if "momentum_buffer" in s]
    moments = [s for s in opt_state["state"].values() if "exp_avg" in s]
    assert buffers and moments  # Muon's and AdamW's state both saved
    run = run_train_cli([*args, "--epochs", "2"])  # resumes epoch 0's checkpoint
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(train_losses(save)) > len(first)
    other = run_train_cli([*args, "--epochs", "3", "--optimizer", "adamw"])  # resuming Muon's state with AdamW
    assert other.returncode != 0 and "optimizer: 'muon' there vs 'adamw' now" in other.stderr, other.stderr[-2000:]
    bad = run_train_cli([*args[:-2], "--save-path", str(tmp_path / "bad"), "--loss", "hinge"])
    assert bad.returncode != 0 and "--loss" in bad.stderr and "hinge" in bad.stderr


@pytest.mark.parametrize("extra", [{"loss": "lk"}, {"gradient_checkpointing": True}])
def test_dflash_refuses_the_eagle3_only_options(extra, tmp_path):
    from speculators.config.train import TrainConfig
    from speculators.errors import UserError
    from speculators.train.components import build_components
    from speculators.train.distributed import DistInfo

    cfg = TrainConfig(verifier_name_or_path=str(tmp_path / "none"), algorithm="dflash", save_path=str(tmp_path / "s"),
                      **extra)
    with pytest.raises(UserError, match="--algorithm dflash"):
        build_components(cfg, DistInfo())
    assert not (tmp_path / "s").exists()
