"""Smoke test: the benchmark harness runs end to end on the tiniest config (CPU, seconds).

Not a timed test: it checks that the scripts under bench/ still fit the code they measure
(trainer, data formats, objective) and that their outputs have the fields the tables use.
The public-package side (bench/public_runner.py) needs its own virtual environment and is
only exercised by bench/run.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_ours_runner_with_profile(tmp_path):
    import ours_runner
    from synthetic import write_v1_dataset

    data = write_v1_dataset(tmp_path / "data", num_samples=8, seq_len=33, hidden_size=64, vocab_size=512)
    out = tmp_path / "r.json"
    res = ours_runner.main(["--data", str(data), "--shape", "tiny", "--seq-len", "32", "--steps", "2",
                            "--profile", "2", "--lr", "1e-3", "--out", str(out)])
    assert json.loads(out.read_text())["impl"] == "ours"
    assert len(res["steps"]) == 2
    assert all(s["tokens"] == 32 and s["tokens_per_s"] > 0 for s in res["steps"])
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in res["steps"])
    regions = {r["region"] for r in res["profile"]["regions"]}
    assert {"attention", "mlp", "lm_head", "kl", "mask build"} <= regions
    timed = [r for r in res["profile"]["regions"] if r["region"] in ("attention", "lm_head")]
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in timed)


def test_public_format_converter_matches_source(tmp_path):
    from safetensors.torch import load_file
    from synthetic import write_v1_dataset
    from to_public_format import convert

    data = write_v1_dataset(tmp_path / "data", num_samples=3, seq_len=10, hidden_size=8, vocab_size=50)
    out = convert(data, tmp_path / "public")
    sample = torch.load(data / "data_1.pt", weights_only=True)
    hs = load_file(str(out / "hidden_states" / "hs_1.safetensors"))
    assert torch.equal(hs["token_ids"], sample["input_ids"])
    assert hs["hidden_states"].shape == (10, 4, 8)
    assert torch.equal(hs["hidden_states"][:, 3], sample["hidden_states"][3])
    from datasets import load_from_disk

    ds = load_from_disk(str(out))
    assert ds[1]["seq_len"] == 10 and torch.equal(ds[1]["loss_mask"], sample["loss_mask"])


def test_lmhead_bench_saved_bytes_on_meta():
    """The 8B-shape memory figures the docs quote come from this meta-device count."""
    import bench_lmhead_kl

    n, v = 8192, 32000
    fp32 = bench_lmhead_kl.saved_on_meta("llama8b", n, 1024, "fp32")
    bf16 = bench_lmhead_kl.saved_on_meta("llama8b", n, 1024, "bf16")
    small = 4 * n * 4  # a few [N] float vectors (row weights, KL) besides the [N, V] tensors
    for got, fused in ((fp32, n * v * 4), (bf16, n * v * 2)):
        assert 0 <= got["eager"] - 2 * n * v * 4 < small
        assert 0 <= got["fused"] - fused < small  # its gradient, in the logits' dtype
        assert got["chunked"] < small


def test_dataload_bench_runs(tmp_path):
    import bench_dataload

    res = bench_dataload.run(argparse.Namespace(
        samples=3, seq_len=16, hidden=8, layers=4, repeats=1, shard_tokens=32, public=True, tmp=str(tmp_path)))
    for name in ("pt", "safetensors", "public"):
        entry = res["layouts"][name]
        assert entry["warm"]["samples_per_s"] > 0 and entry["cold"]["samples_per_s"] > 0
        assert entry["bytes_per_token"] >= 4 * 8 * 2  # at least the bf16 hidden states
    assert not list(tmp_path.iterdir())  # temporary data cleaned up


def test_flops_model_counts_the_frozen_head_once():
    from configs import get_shape

    s = get_shape("llama8b", 2048)
    trained, frozen = s.flops_per_step(2048), s.flops_per_step(2048, train_lm_head=False)
    # freezing lm_head drops exactly its weight-gradient matmul, once per TTT step
    assert trained["total"] - frozen["total"] == pytest.approx(2 * s.param_counts()["lm_head"] * 2048 * s.ttt_steps)
    assert s.param_counts()["embed_tokens_frozen"] == 128256 * 4096


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_regenerate_bench_lands_in_the_summary(tiny_llama, tmp_path):
    """bench_regenerate's JSON has what table.py renders: tokens/s per backend, in summary.md."""
    import bench_regenerate
    import table

    assert bench_regenerate.main(["--model", str(tiny_llama), "--samples", "3", "--max-tokens", "4",
                                  "--backends", "transformers", "--repeats", "2", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "regenerate.json").read_text())
    row = result["backends"]["transformers"]
    assert row["written"] >= 1 and row["tokens"] >= row["written"] and row["tokens_per_s"] > 0
    assert len(row["tokens_per_s_runs"]) == 2  # the upper median of two runs is the faster one
    assert row["tokens_per_s"] == pytest.approx(max(row["tokens_per_s_runs"]), abs=0.06)
    assert result["machine"]["nproc"] >= 1
    text = table.render_all(tmp_path)
    assert "## Regeneration throughput" in text
    assert f"**{table.fmt(row['tokens_per_s'])}**" in text and "- regenerate:" in text


def test_table_renders_the_datagen_online_and_fp8_results(tmp_path):
    """bench/table.py reads the committed results: datagen from before and after the backend and
    storage columns, the online store against the trainer, and the fp8 acceptance verdict."""
    import shutil

    import table

    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    for name in ("datagen.json", "datagen_backends.json", "online.json", "fp8_acceptance.json"):
        shutil.copy(results / name, tmp_path / name)
    text = table.render_all(tmp_path)
    fp8 = json.loads((results / "fp8_acceptance.json").read_text())
    assert "| tiny (H=64, 8 layers) |" in text and "| vllm | float32 |" in text
    assert "## Online store" in text and "trainer consumption" in text
    assert fp8["verdict"] in text
    for name, entry in fp8["storage"].items():
        assert f"| {name} |" in text and f"{entry['mean']:.3f}" in text
