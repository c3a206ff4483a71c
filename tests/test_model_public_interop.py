"""Drafts made by the REAL public speculators package (0.9.0, its own venv) load here and give its
logits, options included (EAGLE-3.1 norms, qwen3 layers, sliding windows); ours load there and
give ours; every option either package or vLLM reads survives the round trip.

The public side runs `tests/public_pkg/build_draft.py` in the public venv (its API only);
tensors travel as safetensors files.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speculators.errors import UserError
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel
from speculators.models.eagle3.config_keys import LAYER_IMPLEMENTED, TOP_LEVEL_IMPLEMENTED

pytestmark = pytest.mark.slow  # the real public package in its own venv, in subprocesses

SCRIPT = Path(__file__).resolve().parent / "public_pkg" / "build_draft.py"
TTT = 3
T = 24

CASES = {
    # their recipe's defaults for eagle3: norm_before_fc + norm_output, every layer sliding (2048)
    "default_recipe": dict(norm_before_fc=True, norm_output=True, sliding_window=2048),
    "plain": dict(),
    "fc_norm_norm_output": dict(fc_norm=True, norm_output=True),
    "qwen3_sliding_2_layers": dict(draft_arch="qwen3", num_layers=2, sliding_window=5, norm_output=True),
    "mixed_window_layers": dict(num_layers=2, sliding_window=4, full_attention_indices=[1], norm_before_fc=True),
    # draft vocab == verifier vocab: the package saves no d2t/t2d at all
    "full_vocab": dict(draft_vocab_size=512, norm_output=True),
}


def _inputs(directory: Path, hidden: int) -> dict[str, torch.Tensor]:
    """A packed row: two documents (14 and 8 tokens) and 2 padding positions."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    doc = torch.tensor([[0] * 14 + [1] * 8 + [-1] * 2])
    pos = torch.cat([torch.arange(14), torch.arange(8), torch.zeros(2, dtype=torch.long)])[None]
    tensors = {
        "hidden_states": torch.randn(1, T, 3 * hidden, generator=g),
        "input_ids": torch.randint(0, 300, (1, T), generator=g),
        "document_ids": doc,
        "position_ids": pos,
    }
    save_file(tensors, str(directory / "inputs.safetensors"))
    return tensors


def _run_public(python: str, specs: list[dict]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([python, "-P", str(SCRIPT), json.dumps(specs)], cwd="/", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["speculators"] == "0.9.0" and "/work/wt/" not in info["file"], info
    return info


def _ours(model: Eagle3DraftModel, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return model(inputs["hidden_states"], inputs["input_ids"], inputs["document_ids"],
                     inputs["position_ids"], ttt_steps=TTT)


def _max_diff(ours: list[torch.Tensor], logits_file: Path, inputs: dict, window: int | None = None) -> float:
    """Largest logit difference over real positions.

    With a sliding window, TTT step `s >= 1` is compared where the window does not bind
    (in-document index < window - s): there the public package keeps the full window at
    every step while we shorten it by `s` as vLLM's drafting does (see model.ttt_window).
    """
    theirs = load_file(str(logits_file))
    real = inputs["document_ids"][0] != -1
    local = inputs["position_ids"][0]
    assert len(theirs) == len(ours) == TTT
    diffs = []
    for i, o in enumerate(ours):
        keep = real & (local < window - i) if (window and i) else real
        assert keep.sum() >= 4
        diffs.append(float((o[0][keep] - theirs[f"step{i}"][0][keep]).abs().max()))
    return max(diffs)


@pytest.fixture(scope="module")
def public_drafts(public_speculators_python, tiny_llama, tmp_path_factory):
    """Every case built, saved and run by the public package in one subprocess."""
    root = tmp_path_factory.mktemp("public_drafts")
    specs, inputs = [], {}
    for name, options in CASES.items():
        inputs[name] = _inputs(root / name, hidden=64)
        specs.append({"verifier": str(tiny_llama), "out": str(root / name), "draft_vocab_size": 256, "seed": 7, **options})
    _run_public(public_speculators_python, specs)
    return root, inputs


@pytest.mark.parametrize("case", list(CASES))
def test_public_draft_loads_here_with_equal_logits(public_drafts, case):
    root, inputs = public_drafts
    model = Eagle3DraftModel.from_pretrained(root / case / "draft").eval()
    window = CASES[case].get("sliding_window")
    assert _max_diff(_ours(model, inputs[case]), root / case / "logits.safetensors", inputs[case], window) < 1e-5


@pytest.mark.parametrize("case", ["default_recipe", "fc_norm_norm_output", "qwen3_sliding_2_layers"])
def test_public_options_change_the_logits(public_drafts, case):
    """Dropping the case's options (what loading did before) gives logits far from theirs:
    the equality above is evidence that each option is implemented, not a coincidence."""
    root, inputs = public_drafts
    data = json.loads((root / case / "draft" / "config.json").read_text())
    plain = Eagle3Config.from_speculators_dict(data)
    plain.norm_output = False
    plain.layer_types, plain.sliding_window = None, None
    model = Eagle3DraftModel(plain)
    state = load_file(str(root / case / "draft" / "model.safetensors"))
    model.load_state_dict(state, strict=False)
    # (a 2048 window over 24 tokens changes nothing; there norm_output alone must show)
    assert _max_diff(_ours(model.eval(), inputs[case]), root / case / "logits.safetensors", inputs[case]) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_keeps_every_key_vllm_and_the_public_package_read(public_drafts, tmp_path, case):
    root, _ = public_drafts
    theirs = json.loads((root / case / "draft" / "config.json").read_text())
    Eagle3DraftModel.from_pretrained(root / case / "draft").save_pretrained(tmp_path)
    ours = json.loads((tmp_path / "config.json").read_text())
    for key in TOP_LEVEL_IMPLEMENTED - {"transformer_layer_config", "speculators_config"}:
        if key in theirs and key != "eagle_aux_hidden_state_layer_ids":
            assert ours.get(key) == theirs[key], key
    # aux ids equal to vLLM's default may be left out (vLLM then uses the same layers)
    from speculators.models.eagle3 import default_aux_layer_ids

    assert (ours.get("eagle_aux_hidden_state_layer_ids") or default_aux_layer_ids(8)) == theirs["eagle_aux_hidden_state_layer_ids"]
    for key in LAYER_IMPLEMENTED:
        if key in theirs["transformer_layer_config"]:
            assert ours["transformer_layer_config"][key] == theirs["transformer_layer_config"][key], key
    assert ours["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == \
        theirs["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    assert ours["speculators_config"]["verifier"] == theirs["speculators_config"]["verifier"]


@pytest.mark.parametrize("case", ["fc_norm_norm_output", "qwen3_sliding_2_layers"])
def test_our_draft_with_options_loads_in_the_public_package(public_speculators_python, public_drafts, tmp_path, case):
    """The other direction: our save, their `from_pretrained` and forward, equal logits."""
    root, inputs = public_drafts
    model = Eagle3DraftModel.from_pretrained(root / case / "draft").eval()
    with torch.no_grad():  # make the weights ours, not theirs passed through
        for p in model.parameters():
            p.mul_(1.1)
    model.save_pretrained(tmp_path / "draft")
    (tmp_path / "run").mkdir()
    save_file(inputs[case], str(tmp_path / "run" / "inputs.safetensors"))
    _run_public(public_speculators_python, [{"load": str(tmp_path / "draft"), "out": str(tmp_path / "run")}])
    window = CASES[case].get("sliding_window")
    assert _max_diff(_ours(model, inputs[case]), tmp_path / "run" / "logits.safetensors", inputs[case], window) < 1e-5


def test_unimplemented_public_option_is_refused_naming_the_key(public_drafts, tmp_path):
    root, _ = public_drafts
    data = json.loads((root / "plain" / "draft" / "config.json").read_text())
    for where, key, value in [("top", "mask_token_id", 5), ("layer", "partial_rotary_factor", 0.5),
                              ("layer", "attention_dropout", 0.1), ("layer", "model_type", "gemma3")]:
        bad = json.loads(json.dumps(data))
        (bad if where == "top" else bad["transformer_layer_config"])[key] = value
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=key):
            Eagle3Config.load(tmp_path)


def test_train_from_pretrained_continues_a_public_eagle31_draft(public_drafts, tiny_llama, tmp_path):
    """`--from-pretrained` on the package's default (EAGLE-3.1 + 2048-window) draft: options kept, weights trained."""
    from speculators.config.train import TrainConfig
    from tests.support.synthetic import write_synthetic_hidden_states
    from speculators.train.trainer import run_training

    root, _ = public_drafts
    source = root / "default_recipe" / "draft"
    data = write_synthetic_hidden_states(tiny_llama, tmp_path / "hs", num_samples=8, seq_len=32)
    save = tmp_path / "run"
    run_training(TrainConfig(verifier_name_or_path=str(tiny_llama), data_path=str(data), save_path=str(save),
                             from_pretrained=str(source), epochs=1, lr=3e-3, total_seq_len=64, ttt_steps=3,
                             log_freq=1000, train_data_ratio=0.75, warmup_steps=1))
    theirs = json.loads((source / "config.json").read_text())
    ours = json.loads((save / "0" / "config.json").read_text())
    for key in ("norm_before_fc", "norm_output", "fc_norm", "norm_before_residual"):
        assert ours[key] == theirs[key], key
    for key in ("layer_types", "sliding_window", "use_sliding_window"):
        assert ours["transformer_layer_config"][key] == theirs["transformer_layer_config"][key], key
    before, after = load_file(str(source / "model.safetensors")), load_file(str(save / "0" / "model.safetensors"))
    assert (before["input_norm.weight"] - after["input_norm.weight"]).abs().max() > 1e-5
    assert torch.equal(before["d2t"], after["d2t"]) and torch.equal(before["t2d"], after["t2d"])
