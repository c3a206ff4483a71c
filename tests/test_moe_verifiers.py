"""MoE verifiers through the whole pipeline on the CPU: tiny random gpt-oss (harmony
template, reasoning in the analysis channel) and Qwen3-MoE (ChatML with <think>):
prepare-data with their templates (ShareGPT plus reasoning/tool conversations), datagen
(transformers backend), train, eval."""

from __future__ import annotations

import json

import pytest
import torch

from speculators.cli import main as cli
from speculators.data.prepare import load_prepared
from speculators.tiny.moe import build_tiny_moe_verifier

from tests.support.chat_families import AGENT_CONV, TOOLS

REASONING = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"It is {2 * i}.",
                   "reasoning_content": f"Adding {i} to itself gives {2 * i}."}]}
    for i in range(6)
] + [{"messages": AGENT_CONV, "tools": TOOLS}]


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe"])
def test_moe_verifier_pipeline(arch, tmp_path, capsys):
    verifier = build_tiny_moe_verifier(tmp_path / "verifier", arch)
    data = tmp_path / "reasoning.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in REASONING))
    prep = tmp_path / "prep"
    assert cli(["prepare-data", "--model", str(verifier), "--data", "sharegpt,max=6", "--data", str(data),
                "--output", str(prep), "--seq-length", "384"]) == 0
    ds = load_prepared(prep)
    assert len(ds) == 13
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(verifier)
    trained = [tok.decode([t for t, m in zip(ids, mask) if m]) for ids, mask in zip(ds["input_ids"], ds["loss_mask"])]
    assert any("Adding 3 to itself gives 6." in t and "It is 6." in t for t in trained)  # reasoning is in the loss
    assert any("get_weather" in t for t in trained)  # the tool call is trained,
    assert not any('{"temp": 21}' in t for t in trained)  # the tool result is not
    if arch == "gpt_oss":  # the analysis channel and the final answer, each turn ending where the model stops
        row = next(t for t in trained if "It is 6." in t)
        assert row == "<|channel|>analysis<|message|>Adding 3 to itself gives 6.<|end|><|start|>assistant" \
                      "<|channel|>final<|message|>It is 6.<|return|>"
    no_reasoning = tmp_path / "prep_final_only"
    assert cli(["prepare-data", "--model", str(verifier), "--data", str(data), "--output", str(no_reasoning),
                "--seq-length", "384", "--no-train-reasoning"]) == 0
    ds2 = load_prepared(no_reasoning)
    trained2 = [tok.decode([t for t, m in zip(ids, mask) if m]) for ids, mask in zip(ds2["input_ids"], ds2["loss_mask"])]
    assert any("It is 6." in t for t in trained2) and not any("itself" in t for t in trained2)

    hs = tmp_path / "hs"
    assert cli(["datagen", "--target-model-path", str(verifier), "--train-data-path", str(prep),
                "--output-dir", str(hs), "--batch-size", "4", "--device", "cpu"]) == 0
    sample = torch.load(hs / "data_0.pt", weights_only=True)
    # The final layer equals a direct transformers forward before the final norm.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(sample["input_ids"][None], output_hidden_states=True)
    last = out.hidden_states[-1][0]  # transformers applies the final norm to the last entry
    normed = model.model.norm(sample["hidden_states"][-1].float())
    assert torch.allclose(normed, last, atol=0.05, rtol=0.05)

    from speculators.config.train import TrainConfig
    from speculators.train.trainer import run_training

    run_training(TrainConfig(verifier_name_or_path=str(verifier), data_path=str(hs), save_path=str(tmp_path / "run"),
                             epochs=1, lr=1e-3, total_seq_len=256, ttt_steps=2, log_freq=1000, warmup_steps=1,
                             num_layers=1))
    report = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(prep), "--num-prompts", "2",
                "--max-new-tokens", "8", "--device", "cpu", "--output-json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["num_prompts"] == 2 and result["generated_tokens"] > 0


def test_eval_cache_rolls_back_past_gpt_oss_sliding_window(tmp_path):
    """Rejected draft tokens are cropped from the KV cache; gpt-oss' sliding-window layers
    must keep enough past for that. Cached calls equal a fresh forward every time."""
    from transformers import AutoModelForCausalLM

    from speculators.evaluate.verifier import Verifier

    verifier = build_tiny_moe_verifier(tmp_path / "v", "gpt_oss")
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32)
    assert model.config.sliding_window == 16
    cached, fresh = Verifier(model, [2, 4, 5]), Verifier(model, [2, 4, 5], use_cache=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (12,), generator=g).tolist()
    for _ in range(24):  # propose 4, accept 1: the cache is cropped by 3 each round, well past the window
        proposal = ids + torch.randint(0, 500, (4,), generator=g).tolist()
        logits, aux, start = cached(proposal, need_logits_from=len(ids) - 1)
        ref_logits, ref_aux, _ = fresh(proposal)
        assert torch.allclose(logits, ref_logits[start:], atol=1e-4)
        assert torch.allclose(aux.float(), ref_aux.float(), atol=2e-2)
        ids = proposal[: len(ids) + 1]
    assert len(ids) > 2 * 16
