"""`speculators eval` on conversation sources: held-out prompts mirror prepare-data."""

import json

from transformers import AutoConfig

from speculators.cli import main
from speculators.data.prepare import PrepareConfig, prepare_data
from speculators.evaluate.runner import prompts_from_prepared, prompts_from_source
from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel


def test_skip_samples_holds_out_exactly_what_prepare_data_left(tiny_llama, tmp_path):
    prepare_data(PrepareConfig(model=str(tiny_llama), data="sharegpt", output=str(tmp_path / "prep"),
                               max_samples=8, seq_length=256))
    held = prompts_from_source("sharegpt", str(tiny_llama), skip=5, limit=3, seq_length=256)
    assert held == prompts_from_prepared(tmp_path / "prep", [5, 6, 7])
    assert prompts_from_prepared(tmp_path / "prep", [0])[0] not in held


def test_eval_cli_on_sharegpt_with_a_random_draft(tiny_llama, tmp_path, capsys):
    cfg = Eagle3Config.from_verifier_config(AutoConfig.from_pretrained(tiny_llama), speculative_tokens=2,
                                            verifier_name_or_path=str(tiny_llama))
    Eagle3DraftModel(cfg).save_pretrained(tmp_path / "draft")
    out = tmp_path / "r.json"
    rc = main(["eval", "--checkpoint", str(tmp_path / "draft"), "--data", "sharegpt", "--skip-samples", "4",
               "--num-prompts", "3", "--max-new-tokens", "10", "--max-prompt-len", "64", "--output-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 3 and report["num_speculative_tokens"] == 2
    assert report["generated_tokens"] <= 30 and report["mean_acceptance_length"] < 1.2
    assert "ideal speedup" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "draft")]) == 2  # needs --data
