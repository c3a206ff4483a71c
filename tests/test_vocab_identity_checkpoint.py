"""Full-vocabulary drafts are saved without d2t/t2d (vLLM 0.31-0.33 create no
draft_id_to_target_id then and refuse the tensor); the loader accepts both layouts.
That vLLM loads such a checkpoint: tests/test_real_vllm.py serves one."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel


def _cfg(draft_vocab_size: int) -> Eagle3Config:
    return Eagle3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, vocab_size=50, draft_vocab_size=draft_vocab_size, verifier_name_or_path="/v")


def _keys(directory) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_identity_mapping_is_left_out_and_loads_back(tmp_path):
    model = Eagle3DraftModel(_cfg(50))
    model.save_pretrained(tmp_path / "full")
    assert not {"d2t", "t2d"} & _keys(tmp_path / "full")
    back = Eagle3DraftModel.from_pretrained(tmp_path / "full")
    assert torch.equal(back.d2t, torch.zeros(50, dtype=torch.long)) and bool(back.t2d.all())
    # An older full-vocab checkpoint that still carries the identity tensors loads too.
    state = load_file(str(tmp_path / "full" / "model.safetensors"))
    state.update(d2t=torch.zeros(50, dtype=torch.long), t2d=torch.ones(50, dtype=torch.bool))
    save_file(state, str(tmp_path / "full" / "model.safetensors"))
    assert torch.equal(Eagle3DraftModel.from_pretrained(tmp_path / "full").d2t, back.d2t)


def test_a_real_mapping_is_kept_and_required(tmp_path):
    model = Eagle3DraftModel(_cfg(20))
    t2d = torch.zeros(50, dtype=torch.bool)
    t2d[torch.arange(0, 40, 2)] = True
    d2t = torch.nonzero(t2d).flatten() - torch.arange(20)
    model.set_vocab_mapping(d2t, t2d)
    model.save_pretrained(tmp_path / "mapped")
    assert {"d2t", "t2d"} <= _keys(tmp_path / "mapped")
    assert torch.equal(Eagle3DraftModel.from_pretrained(tmp_path / "mapped").d2t, d2t)
    state = load_file(str(tmp_path / "mapped" / "model.safetensors"))
    del state["d2t"], state["t2d"]
    save_file(state, str(tmp_path / "mapped" / "model.safetensors"))
    with pytest.raises(UserError, match="missing"):
        Eagle3DraftModel.from_pretrained(tmp_path / "mapped")
