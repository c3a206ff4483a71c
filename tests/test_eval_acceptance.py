"""Done-criterion check on the CPU: a trained draft is accepted, a random one is not.

The tiny verifier writes its own replies to held-out ShareGPT prompts (on-policy
data); a draft trained for a few epochs on other prompts must reach a mean
acceptance length clearly above 1, while a random-init draft stays at about 1.
"""

import json

import pytest
from transformers import AutoConfig

from speculators.cli import main
from speculators.datagen.runner import DatagenConfig, run_datagen
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel

from tests.support.self_distill import save_prepared, self_distilled_rows


@pytest.mark.slow
def test_trained_draft_beats_random_draft_on_heldout_prompts(tiny_llama, tmp_path):
    rows = self_distilled_rows(tiny_llama, 72, max_new_tokens=48)
    train, heldout = save_prepared(rows[:64], tmp_path / "train"), save_prepared(rows[64:], tmp_path / "heldout")
    run_datagen(DatagenConfig(target_model_path=str(tiny_llama), train_data_path=str(train),
                              output_dir=str(tmp_path / "hs"), batch_size=8, device="cpu"))
    assert main(["train", "--verifier-name-or-path", str(tiny_llama), "--data-path", str(tmp_path / "hs"),
                 "--save-path", str(tmp_path / "ckpt"), "--epochs", "10", "--total-seq-len", "512",
                 "--device", "cpu", "--lr", "3e-3", "--ttt-steps", "3", "--train-data-ratio", "0.95",
                 "--log-freq", "1000"]) == 0

    random_dir = tmp_path / "random"
    cfg = Eagle3Config.from_verifier_config(AutoConfig.from_pretrained(tiny_llama), speculative_tokens=3,
                                            verifier_name_or_path=str(tiny_llama))
    Eagle3DraftModel(cfg).save_pretrained(random_dir)

    reports = {}
    for name, ckpt in (("trained", tmp_path / "ckpt"), ("random", random_dir)):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(heldout), "-k", "3",
                     "--max-new-tokens", "48", "--output-json", str(out)]) == 0
        reports[name] = json.loads(out.read_text())
    trained, rnd = reports["trained"], reports["random"]
    print("acceptance length trained", trained["mean_acceptance_length"], "random", rnd["mean_acceptance_length"])
    assert trained["source"] == "pytorch" and trained["num_prompts"] == 8
    assert trained["mean_acceptance_length"] > 1.3
    assert rnd["mean_acceptance_length"] < 1.1
    assert trained["acceptance_rate_per_position"][0] > rnd["acceptance_rate_per_position"][0]
    assert trained["ideal_speedup"] == trained["mean_acceptance_length"]
    # The same prompts through the real vLLM engine: tests/test_real_vllm.py.
