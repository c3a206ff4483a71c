"""The DFlash draft: its config as vLLM reads it, its block attention against a brute-force
reference, lossless speculative decoding with it, and `speculators train --algorithm dflash`.

The real vLLM engine serving a trained DFlash draft (acceptance equal to this eval) is
tests/test_real_vllm_dflash.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from speculators.errors import UserError
from speculators.models.dflash import DFlashConfig, DFlashDraftModel


def _config(**kw) -> DFlashConfig:
    base = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=97, draft_vocab_size=97, aux_layer_ids=[1, 2, 3], mask_token_id=96, block_size=4,
                num_layers=2, verifier_name_or_path="/v", verifier_architectures=["Qwen3ForCausalLM"])
    base.update(kw)
    return DFlashConfig(**base)


def _draft(seed: int = 0, **kw) -> DFlashDraftModel:
    torch.manual_seed(seed)
    model = DFlashDraftModel(_config(**kw))
    with torch.no_grad():  # non-trivial norms so a mixed-up norm shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        model.embed_tokens.weight.normal_()
    return model.eval()


def test_vllm_reads_the_config_as_a_dflash_draft():
    """vLLM's own speculators-config reader (the code `vllm serve` runs) on our config.json."""
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    d = _config().to_speculators_dict()
    spec = SpeculatorsConfig.extract_vllm_speculative_config(json.loads(json.dumps(d)))
    assert spec == {"method": "dflash", "num_speculative_tokens": 3}
    hf = SpeculatorsConfig.extract_transformers_pre_trained_config(json.loads(json.dumps(d)))
    assert hf["architectures"] == ["DFlashDraftModel"]
    assert hf["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    # vLLM's DFlash layer numbering is one lower; mask slots and a non-causal block.
    assert hf["dflash_config"] == {"mask_token_id": 96, "target_layer_ids": [0, 1, 2], "sample_from_anchor": False,
                                   "causal": False}
    assert hf["num_hidden_layers"] == 2 and hf["head_dim"] == 16 and hf["model_type"] == "qwen3"
    assert DFlashConfig.from_speculators_dict(d) == _config()


def test_bad_configs_are_refused_naming_the_key():
    with pytest.raises(UserError, match="mask_token_id 97"):
        _config(mask_token_id=97)
    d = _config().to_speculators_dict()
    d["block_size"] = 6
    with pytest.raises(UserError, match="block_size 6 disagrees with speculative_tokens 3"):
        DFlashConfig.from_speculators_dict(d)
    d = _config().to_speculators_dict() | {"use_swa": True}
    with pytest.raises(UserError, match="use_swa"):
        DFlashConfig.from_speculators_dict(d)


def _rope(x, pos, theta=10000.0):
    """Neox RoPE, written out: x [T, h, d], pos [T]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None].float(), torch.cat([ang.sin(), ang.sin()], -1)[:, None].float()
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat([-b, a], -1) * sin


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _reference_block(model: DFlashDraftModel, aux, ctx_pos, anchor_id, anchor_pos):
    """One block, by hand: context = aux rows given (all visible), queries [anchor, mask...]."""
    c = model.config
    bs, hd, nh, nkv = c.block_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    ctx = _rms(aux @ model.fc.weight.T, model.hidden_norm.weight)
    ids = torch.tensor([anchor_id] + [c.mask_token_id] * (bs - 1))
    x = model.embed_tokens.weight[ids]
    qpos = anchor_pos + torch.arange(bs)
    for layer in model.layers:
        at = layer.self_attn
        h = _rms(x, layer.input_layernorm.weight)
        q = _rope(_rms((h @ at.q_proj.weight.T).view(bs, nh, hd), at.q_norm.weight), qpos)
        keys, vals = [], []
        for src, pos in ((ctx, ctx_pos), (h, qpos)):
            k = _rope(_rms((src @ at.k_proj.weight.T).view(-1, nkv, hd), at.k_norm.weight), pos)
            keys.append(k)
            vals.append((src @ at.v_proj.weight.T).view(-1, nkv, hd))
        k, v = torch.cat(keys), torch.cat(vals)
        out = torch.empty(bs, nh, hd)
        for head in range(nh):
            g = head // (nh // nkv)
            p = torch.softmax((q[:, head] @ k[:, g].T) / math.sqrt(hd), dim=-1)  # every key: non-causal
            out[:, head] = p @ v[:, g]
        x = x + out.reshape(bs, -1) @ at.o_proj.weight.T
        m = layer.mlp
        hh = _rms(x, layer.post_attention_layernorm.weight)
        x = x + (F.silu(hh @ m.gate_proj.weight.T) * (hh @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return _rms(x, model.norm.weight)


def test_packed_blocks_equal_a_brute_force_reference_per_anchor():
    """Two documents packed in one row, an anchor in each and one at a document start: each block
    sees only its own document's context up to its anchor."""
    model = _draft()
    t, a_dim = 12, 3 * 64
    aux = torch.randn(1, t, a_dim)
    docs = torch.tensor([[0] * 7 + [1] * 5])
    ctx_pos = torch.tensor([list(range(7)) + list(range(5))])
    anchors = torch.tensor([[3, 7, 10]])  # index i: context rows of its doc with index <= i
    ids = torch.tensor([[5, 9, 11]])
    pos = torch.tensor([[4, 1, 4]])
    j = torch.arange(t)
    visible = (j[None, None] <= anchors[..., None]) & (docs[:, None] == docs.gather(1, anchors)[..., None])
    with torch.no_grad():
        got = model.blocks(aux, ctx_pos, ids, pos, visible)
        for n, (i, tok, p) in enumerate(zip(anchors[0].tolist(), ids[0].tolist(), pos[0].tolist())):
            rows = [r for r in range(t) if r <= i and docs[0, r] == docs[0, i]]
            want = _reference_block(model, aux[0, rows], ctx_pos[0, rows], tok, p)
            torch.testing.assert_close(got[0, n], want, atol=2e-5, rtol=2e-5)


def test_propose_equals_the_reference_and_maps_draft_ids():
    model = _draft(seed=1)
    aux = torch.randn(6, 3 * 64)
    with torch.no_grad():
        logits = model.propose(aux, 7)
        want = model.lm_head(_reference_block(model, aux, torch.arange(6), 7, 6)[1:])
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=2e-5)
    with pytest.raises(UserError, match="drafts 1..3 tokens"):
        model.propose(aux, 7, 4)


def test_speculative_decoding_with_a_dflash_draft_is_lossless(tiny_qwen3):
    """Greedy speculative decoding with a (random) DFlash draft returns the verifier's greedy text."""
    from speculators.evaluate.proposers import DFlashProposer
    from speculators.evaluate.spec_decode import greedy_generate, speculative_generate
    from speculators.evaluate.verifier import Verifier
    from speculators.models.dflash import DFlashConfig
    from speculators.verifier import read_verifier_config

    vc = read_verifier_config(str(tiny_qwen3))
    cfg = DFlashConfig.from_verifier_config(vc, aux_layer_ids=[1, 2, 3], block_size=4)
    torch.manual_seed(0)
    draft = DFlashDraftModel(cfg)
    verifier = Verifier.from_pretrained(str(tiny_qwen3), [1, 2, 3])
    prompt = [5, 17, 33, 2, 9]
    want = greedy_generate(verifier, prompt, 24)
    got = speculative_generate(verifier, DFlashProposer(draft, cfg.vocab_size), prompt, 24, k=3)
    assert got.tokens == want
    assert got.counts.num_drafts == got.verifier_forwards - 1 > 0


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    from speculators.tiny.builders import build_tiny_verifier

    return build_tiny_verifier(tmp_path_factory.mktemp("dflash") / "verifier", arch="qwen3", hidden_size=64,
                               num_layers=4, vocab_size=256)


@pytest.fixture(scope="module")
def data(tiny_qwen3, tmp_path_factory):
    from tests.support.synthetic import write_synthetic_hidden_states

    return write_synthetic_hidden_states(tiny_qwen3, tmp_path_factory.mktemp("dflash_data"), num_samples=12,
                                         seq_len=40, layer_ids=[1, 2, 3, 4])


def test_train_cli_algorithm_dflash(tiny_qwen3, data, tmp_path):
    """`speculators train --algorithm dflash`: the loss falls, the checkpoint is a DFlash draft in
    vLLM's tensor names on the data's layers, our eval loads it; mixing algorithms is refused."""
    from safetensors.torch import load_file

    from speculators.models.drafts import load_draft
    from tests.support.train_helpers import run_train_cli, train_losses

    save = tmp_path / "run"
    args = ["--verifier-name-or-path", str(tiny_qwen3), "--data-path", str(data), "--save-path", str(save),
            "--algorithm", "dflash", "--ttt-steps", "3", "--epochs", "4", "--lr", "3e-3", "--total-seq-len", "80",
            "--warmup-steps", "1", "--train-data-ratio", "0.75", "--eval-prompts", "2", "--eval-max-tokens", "8",
            "--num-layers", "1"]
    run = run_train_cli(args)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = train_losses(save)
    steps = sorted(losses)
    assert sum(losses[s] for s in steps[-3:]) < 0.7 * sum(losses[s] for s in steps[:3]), losses
    ckpt = save / "checkpoint_best"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["speculators_model_type"] == "dflash" and cfg["aux_hidden_state_layer_ids"] == [1, 2, 3]
    vocab = json.loads((tiny_qwen3 / "config.json").read_text())["vocab_size"]
    assert cfg["block_size"] == 4 and cfg["mask_token_id"] == vocab - 1  # the default: the last id
    names = set(load_file(str(ckpt / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "lm_head.weight", "embed_tokens.weight",
            "layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_proj.weight",
            "layers.0.mlp.gate_proj.weight"} <= names and "d2t" not in names
    assert isinstance(load_draft(ckpt), DFlashDraftModel)
    acc = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "acceptance" for r in acc)
    again = run_train_cli([*[a if a != "dflash" else "eagle3" for a in args]])
    assert again.returncode != 0 and "algorithm" in again.stderr


def test_mask_token_out_of_range_is_a_user_error(tiny_qwen3, data, tmp_path):
    from speculators.config.train import TrainConfig
    from speculators.train.trainer import run_training

    cfg = TrainConfig(verifier_name_or_path=str(tiny_qwen3), data_path=str(data), save_path=str(tmp_path / "r"),
                      algorithm="dflash", mask_token_id=100000, epochs=1, total_seq_len=64)
    with pytest.raises(UserError, match="mask_token_id 100000 is outside the verifier vocabulary"):
        run_training(cfg)


def test_objective_equals_drafting_each_prefix_by_hand(tiny_qwen3, data):
    """The training objective on a packed batch (two documents) equals, slot by slot, the KL of
    what `propose` drafts after each verified prefix of the raw samples against the verifier's
    distribution of that token (computed from the raw final-layer states): the batch's shift,
    positions, context mask and targets line up with drafting."""
    from speculators.data.dataset import Eagle3Collator, shift_sample
    from speculators.data.formats import open_sample_store
    from speculators.models.dflash import DFlashConfig
    from speculators.train.dflash_objective import DFlashObjective
    from speculators.train.losses import kl_per_token
    from speculators.train.objective import step_token_counts
    from speculators.train.verifier import VerifierHead
    from speculators.verifier import load_verifier_weights, read_verifier_config

    vc = read_verifier_config(str(tiny_qwen3))
    weights = load_verifier_weights(str(tiny_qwen3), vc)
    torch.manual_seed(0)
    draft = DFlashDraftModel(DFlashConfig.from_verifier_config(vc, aux_layer_ids=[1, 2, 3], block_size=4)).eval()
    with torch.no_grad():  # weights large enough that every context key moves the KL visibly
        for name, p in draft.named_parameters():
            if p.ndim == 2 and not name.startswith("embed"):
                p.normal_(std=0.3)
    head = VerifierHead.from_weights(weights, draft.t2d, float(vc.rms_norm_eps))
    store = open_sample_store(data, on_corrupt="raise")
    raw = [store.load(0), store.load(1)]
    for r in raw:  # a loss mask with holes, so masked targets matter
        r["loss_mask"] = r["loss_mask"].clone()
        r["loss_mask"][10:13] = 0
    batch = Eagle3Collator(80, pack=True)([shift_sample(r) for r in raw])
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    k_slots = 3
    objective = DFlashObjective(draft, head, "eager", 0, num_anchors=0)
    with torch.no_grad():
        _, stats = objective(batch, k_slots, 1.0, step_token_counts(batch["loss_mask"], batch["document_ids"], k_slots))

    want = torch.zeros(k_slots, 2, dtype=torch.float64)  # per slot: KL sum, count
    with torch.no_grad():
        for r in raw:
            ids, mask = r["input_ids"], r["loss_mask"]
            aux = torch.cat([h.float() for h in r["hidden_states"][:-1]], dim=-1)
            last = r["hidden_states"][-1].float()
            n = ids.shape[0]
            for i in range(n - 1):  # verified prefix 0..i, anchor = token i+1
                if not mask[i + 1]:
                    continue  # slot 1 does not count: no block here
                logits = draft.propose(aux[: i + 1], int(ids[i + 1]))
                for k in range(1, k_slots + 1):
                    # slot k drafts token i+1+k, which the verifier predicts from position i+k
                    # (past the sample's end too: the verifier's distribution there is known)
                    if i + k >= n or not mask[i + k]:
                        continue
                    tgt = F.log_softmax(head(last[i + k][None]), -1)
                    want[k - 1, 0] += float(kl_per_token(logits[k - 1][None], tgt))
                    want[k - 1, 1] += 1
    torch.testing.assert_close(stats[:, 1].double(), want[:, 1])
    torch.testing.assert_close(stats[:, 0].double(), want[:, 0], rtol=1e-5, atol=1e-4)


def test_mask_token_id_without_dflash_is_refused(tiny_qwen3, data, tmp_path):
    from speculators.config.train import TrainConfig
    from speculators.train.trainer import run_training

    cfg = TrainConfig(verifier_name_or_path=str(tiny_qwen3), data_path=str(data), save_path=str(tmp_path / "r"),
                      mask_token_id=5, epochs=1, total_seq_len=64)
    with pytest.raises(UserError, match="--mask-token-id applies to --algorithm dflash only"):
        run_training(cfg)
