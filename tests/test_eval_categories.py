"""Prompt sets with categories (`speculators.evaluate.prompt_sets`) and the load client's math.

Per-category acceptance is checked against a brute-force computation: each prompt decoded on
its own with `speculative_generate`, its counts added up by hand per category. The tokens of a
prompt are checked against the tokenizer's own chat template rendering. The load client's
summary is checked against numpy on synthetic request timings (the real engine's timings are
in tests/test_eval_speedup.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from speculators.cli import main

from tests.support.constant_draft import constant_draft, varied_verifier

CATEGORIES = ["math", "code", "math", "chat", "code"]
PROMPTS = ["What is 12 times 7?", "Write a loop in Python.", "Is 91 prime?", "Hello, how was your day?",
           "Explain a linked list."]


def _write_set(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def prompt_file(tmp_path):
    records = [{"prompt": p, "category": c} for p, c in zip(PROMPTS, CATEGORIES)]
    # one in the messages layout, with an assistant turn the prompt must stop before
    records[3] = {"messages": [{"role": "user", "content": PROMPTS[3]}, {"role": "assistant", "content": "Fine."}],
                  "category": "chat"}
    return _write_set(tmp_path / "prompts.jsonl", records)


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    return varied_verifier(tmp_path_factory.mktemp("verifier"))


@pytest.fixture()
def draft(verifier, prompt_file, tmp_path):
    from speculators.evaluate.runner import load_prompt_set_of

    return constant_draft(verifier, load_prompt_set_of(str(prompt_file), str(verifier)).prompts, tmp_path / "draft")


def test_prompt_tokens_are_the_chat_templates_generation_prompt(prompt_file, tiny_llama):
    from speculators.evaluate.runner import load_prompt_set_of

    ps = load_prompt_set_of(str(prompt_file), str(tiny_llama))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for ids, text in zip(ps.prompts, PROMPTS):
        want = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
        assert ids == list(want)
    assert ps.categories == CATEGORIES
    # --skip-samples / --num-prompts / --max-prompt-len apply in file order
    part = load_prompt_set_of(str(prompt_file), str(tiny_llama), num_prompts=2, skip_samples=1, max_prompt_len=5)
    assert part.categories == CATEGORIES[1:3] and part.prompts == [p[-5:] for p in ps.prompts[1:3]]


def test_bad_prompt_lines_name_the_file_and_line(tmp_path, tiny_llama):
    from speculators.errors import UserError
    from speculators.evaluate.runner import load_prompt_set_of

    bad = _write_set(tmp_path / "bad.jsonl", [{"prompt": "ok", "category": "a"}, {"category": "b"}])
    with pytest.raises(UserError, match=r"bad.jsonl line 2: needs 'prompt'"):
        load_prompt_set_of(str(bad), str(tiny_llama))
    bad = _write_set(tmp_path / "bad2.jsonl", [{"prompt": "ok", "category": ""}])
    with pytest.raises(UserError, match=r"line 1: 'category' must be a non-empty string"):
        load_prompt_set_of(str(bad), str(tiny_llama))


def test_per_category_acceptance_equals_brute_force_per_prompt(prompt_file, draft, verifier, tmp_path):
    from speculators.evaluate.proposers import Eagle3Proposer
    from speculators.evaluate.runner import eos_ids_of, load_prompt_set_of
    from speculators.evaluate.spec_decode import speculative_generate
    from speculators.evaluate.verifier import Verifier
    from speculators.models.eagle3 import default_aux_layer_ids

    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(draft), "--data", str(prompt_file), "--device", "cpu",
                 "--max-new-tokens", "12", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    cats = report["categories"]
    assert list(cats) == ["math", "code", "chat"]

    # brute force: every prompt alone, its accepted prefix lengths summed per category by hand
    proposer = Eagle3Proposer.from_checkpoint(draft, device=torch.device("cpu"), dtype=torch.float32)
    target = Verifier.from_pretrained(str(verifier), [], dtype=torch.float32, device=torch.device("cpu"))
    target.aux_layer_ids = list(proposer.model.config.aux_layer_ids or default_aux_layer_ids(8))
    prompts = load_prompt_set_of(str(prompt_file), str(verifier)).prompts
    drafts: dict[str, int] = {}
    accepted: dict[str, list[int]] = {}
    for prompt, cat in zip(prompts, CATEGORIES):
        res = speculative_generate(target, proposer, prompt, 12, 3, 0.0, eos_ids_of(str(verifier)),
                                   torch.Generator().manual_seed(0))
        drafts[cat] = drafts.get(cat, 0) + len(res.accepted)
        accepted.setdefault(cat, []).extend(res.accepted)
    for cat, fig in cats.items():
        assert fig["num_prompts"] == CATEGORIES.count(cat)
        assert fig["num_drafts"] == drafts[cat]
        assert fig["mean_acceptance_length"] == pytest.approx(1 + sum(accepted[cat]) / drafts[cat])
        assert fig["acceptance_rate_per_position"] == pytest.approx(
            [sum(a > i for a in accepted[cat]) / drafts[cat] for i in range(3)])
    everything = [a for cat in accepted for a in accepted[cat]]
    assert report["mean_acceptance_length"] == pytest.approx(1 + sum(everything) / len(everything))
    lengths = {c: round(f["mean_acceptance_length"], 3) for c, f in cats.items()}
    print(lengths)
    assert len(set(lengths.values())) > 1 and 1.0 < report["mean_acceptance_length"] < 4.0  # not a trivial case


def test_the_load_summary_against_numpy():
    from speculators.vllm.loadgen import RequestTiming, summarize

    rng = np.random.default_rng(0)
    timings = []
    for _ in range(7):
        sent = float(rng.uniform(0, 1))
        first = sent + float(rng.uniform(0.05, 0.3))
        n = int(rng.integers(1, 20))
        timings.append(RequestTiming(sent, first, first + float(rng.uniform(0.1, 2)), n))
    s = summarize(timings, concurrency=3)
    wall = max(t.done for t in timings) - min(t.sent for t in timings)
    assert s["output_tokens"] == sum(t.output_tokens for t in timings)
    assert s["output_tokens_per_s"] == pytest.approx(s["output_tokens"] / wall)
    ttft = np.array([t.first - t.sent for t in timings])
    tpot = np.array([(t.done - t.first) / (t.output_tokens - 1) for t in timings if t.output_tokens > 1])
    assert s["ttft_ms"]["mean"] == pytest.approx(1000 * ttft.mean())
    assert s["ttft_ms"]["median"] == pytest.approx(1000 * np.median(ttft))
    assert s["ttft_ms"]["p90"] == pytest.approx(1000 * np.percentile(ttft, 90))
    assert s["tpot_ms"]["mean"] == pytest.approx(1000 * tpot.mean())
    assert s["tpot_ms"]["p90"] == pytest.approx(1000 * np.percentile(tpot, 90))


def test_the_step_breakdown_reproduces_the_measured_ratio():
    """tau / (1 + K * implied_draft_cost) must give back the measured tokens/s ratio."""
    from speculators.vllm.speedup import compare_level

    base = {"concurrency": 1, "output_tokens_per_s": 100.0, "tpot_ms": {"mean": 10.0}, "ttft_ms": {"mean": 20.0}}
    spec = {"concurrency": 1, "output_tokens_per_s": 80.0, "tpot_ms": {"mean": 12.5}, "ttft_ms": {"mean": 30.0},
            "acceptance": {"mean_acceptance_length": 2.0}}
    cmp = compare_level(base, spec, k=3)
    assert cmp["measured_speedup"] == pytest.approx(0.8)
    assert 2.0 / (1 + 3 * cmp["implied_draft_cost"]) == pytest.approx(0.8)
    assert cmp["breakdown"]["speculative_step_ms"] == pytest.approx(25.0)  # 2 tokens at 12.5 ms each
    assert cmp["breakdown"]["draft_and_verify_overhead_ms"] == pytest.approx(15.0)


def test_the_training_probe_reads_a_prompt_set(prompt_file, tiny_llama):
    """`train --eval-data PROMPTS.jsonl`: the probe's fixed prompts are the set's, in file order."""
    from types import SimpleNamespace

    from speculators.train.acceptance import choose_prompts

    cfg = SimpleNamespace(eval_prompts=3, eval_data=str(prompt_file), verifier_name_or_path=str(tiny_llama),
                          online=False)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    want = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)) for p in PROMPTS[:3]]
    assert choose_prompts(cfg, None, []) == want


def test_measure_speedup_refuses_bad_input_before_starting_anything(capsys):
    """Each refusal names the flag (no server is started for these)."""
    cases = [
        (["--data", "sharegpt"], "--measure-speedup needs --checkpoint DIR"),
        (["--vllm-endpoint", "http://127.0.0.1:9", "--data", "sharegpt"], "needs both --baseline-endpoint"),
        (["--checkpoint", "x", "--data", "sharegpt", "--concurrency", "1,0"], "--concurrency '1,0': each must be >= 1"),
        (["--checkpoint", "x", "--data", "sharegpt", "--temperature", "0.5"], "decodes greedily"),
        (["--checkpoint", "x"], "--measure-speedup needs --data"),
    ]
    for extra, message in cases:
        assert main(["eval", "--measure-speedup", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "--baseline-endpoint", "http://127.0.0.1:9", "--vllm-endpoint", "http://127.0.0.1:9"]) == 2
    assert "--baseline-endpoint applies with --measure-speedup" in capsys.readouterr().err
