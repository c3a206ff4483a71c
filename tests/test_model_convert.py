"""`speculators convert` (SpecForge EAGLE-3 layout -> speculators) and `speculators --version`.

The real-engine check (vLLM runs the SpecForge original, our eval the converted draft, the
drafts agree) is in test_model_options_vllm.py; here: the key mapping tensor by tensor, the
config, and every refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators.cli import main
from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3DraftModel
from speculators.models.eagle3.specforge import convert_specforge

from tests.support.specforge_layout import build_specforge_draft


@pytest.fixture()
def specforge(tiny_llama, tmp_path):
    return build_specforge_draft(tmp_path / "sf", tiny_llama, seed=3)


def test_convert_maps_every_tensor_and_option(tiny_llama, specforge, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(specforge), "--verifier", str(tiny_llama), "--output", str(out)]) == 0
    assert "convert:" in capsys.readouterr().out
    source = load_file(str(specforge / "model.safetensors"))
    converted = load_file(str(out / "model.safetensors"))
    expected = {k.replace("midlayer.", "layers.0."): v for k, v in source.items()}
    assert set(converted) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_before_residual"] is False  # SpecForge's midlayer residual is the un-normed hidden state
    assert (cfg["fc_norm"], cfg["norm_output"], cfg["norm_before_fc"]) == (True, True, False)
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == str(Path(tiny_llama).resolve())
    model = Eagle3DraftModel.from_pretrained(out)
    assert model.config.fc_norm and model.config.norm_output and len(model.fc_norm) == 3


def test_convert_copies_a_missing_embedding_from_the_verifier(tiny_llama, specforge, tmp_path):
    tensors = load_file(str(specforge / "model.safetensors"))
    embed = tensors.pop("embed_tokens.weight")
    save_file(tensors, str(specforge / "model.safetensors"))
    convert_specforge(specforge, tmp_path / "c", str(tiny_llama))
    assert torch.equal(load_file(str(tmp_path / "c" / "model.safetensors"))["embed_tokens.weight"], embed)


@pytest.mark.parametrize("break_it,match", [
    (lambda cfg, t: t.update({"midlayer.self_attn.extra.weight": torch.ones(2)}), "midlayer.self_attn.extra"),
    (lambda cfg, t: cfg.update({"use_qk_norm_mystery": True}), "use_qk_norm_mystery"),
    (lambda cfg, t: cfg.update({"num_hidden_layers": 2}), "num_hidden_layers"),
    (lambda cfg, t: cfg.update({"architectures": ["Qwen3ForCausalLM"]}), "architectures"),
    (lambda cfg, t: cfg.update({"use_sliding_window": True, "sliding_window": 64}), "use_sliding_window"),
])
def test_convert_refuses_what_it_cannot_represent(tiny_llama, specforge, tmp_path, break_it, match):
    cfg = json.loads((specforge / "config.json").read_text())
    tensors = load_file(str(specforge / "model.safetensors"))
    break_it(cfg, tensors)
    (specforge / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(specforge / "model.safetensors"))
    with pytest.raises(UserError, match=match):
        convert_specforge(specforge, tmp_path / "out", str(tiny_llama))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_convert_never_writes_into_a_non_empty_directory(tiny_llama, specforge, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert main(["convert", str(specforge), "--verifier", str(tiny_llama), "--output", str(out)]) == 2
    assert (out / "keep.txt").read_text() == "user file" and not (out / "config.json").exists()


def test_version_names_this_package_and_where_it_lives():
    proc = subprocess.run([sys.executable, "-m", "speculators", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    import speculators

    assert "EAGLE-3 trainer + dashboard project" in proc.stdout
    assert str(Path(speculators.__file__).resolve().parent) in proc.stdout
    assert "not vllm-project/speculators" in proc.stdout
