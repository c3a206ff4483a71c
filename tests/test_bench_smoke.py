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


def test_frozen_head_variant_runs_the_trainers_flag(tmp_path):
    """side_by_side's `ours-frozen-head` passes the trainer's --freeze-lm-head: the head leaves the
    trained parameters (its draft_vocab x hidden fewer) and the run still trains."""
    import ours_runner
    from configs import get_shape
    from side_by_side import VARIANTS
    from synthetic import write_v1_dataset

    impl, extra = VARIANTS["ours-frozen-head"]
    assert impl == "ours" and "--freeze-lm-head" in extra
    data = write_v1_dataset(tmp_path / "data", num_samples=6, seq_len=33, hidden_size=64, vocab_size=512)
    common = ["--data", str(data), "--shape", "tiny", "--seq-len", "32", "--steps", "2", "--lr", "1e-3"]
    trained = ours_runner.main([*common, "--out", str(tmp_path / "a.json")])
    frozen = ours_runner.main([*common, *extra, "--out", str(tmp_path / "b.json")])
    shape = get_shape("tiny", 32)
    assert trained["trainable_params"] - frozen["trainable_params"] == shape.draft_vocab * shape.hidden_size
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in frozen["steps"])
    assert trained["steps"][0]["loss"] == frozen["steps"][0]["loss"]  # same start; only the update differs


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
        samples=3, seq_len=16, hidden=8, layers=4, repeats=1, shard_tokens=32, public=True, tmp=str(tmp_path),
        hidden_states_dtypes="bf16,fp8"))
    for name in ("pt", "safetensors", "public"):
        entry = res["layouts"][name]
        assert entry["warm"]["samples_per_s"] > 0 and entry["cold"]["samples_per_s"] > 0
        assert entry["bytes_per_token"] >= 4 * 8 * 2  # at least the bf16 hidden states
    for name in ("pt-fp8", "safetensors-fp8"):
        entry = res["layouts"][name]
        assert entry["bytes_per_token"] > 4 * (8 + 4)  # e4m3 values + a float32 scale per row (+ headers)
        # the batch copied to the device: fp8 bits + scales, vs bf16 for the host-dequantised path
        assert entry["batch_hidden_bytes_per_token"] == 4 * (8 + 4)
        assert entry["host_dequant_batch_hidden_bytes_per_token"] == 4 * 8 * 2
        assert entry["step_input_samples_per_s"] > 0 and entry["host_dequant_step_input_samples_per_s"] > 0
    assert res["layouts"]["pt"]["batch_hidden_bytes_per_token"] == 4 * 8 * 2
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


def test_side_by_side_ratio_is_per_repeat_with_its_spread():
    from side_by_side import paired_ratio, spread

    ours, theirs = [150.0, 120.0, 160.0], [100.0, 100.0, 100.0]
    p = paired_ratio(ours, theirs)
    assert p["per_repeat"] == [1.5, 1.2, 1.6] and p["median"] == 1.5
    assert (p["min"], p["max"]) == (1.2, 1.6)
    assert p["spread"] == pytest.approx((1.6 - 1.2) / 1.5)
    assert spread([10.0, 10.5, 9.5]) == pytest.approx(0.1)


def test_gpu_targets_read_the_results(tmp_path):
    import gpu_targets

    def train(name, mfu, device="cuda:0"):
        run = {"fraction_of_peak": mfu, "device": device, "rows": 1, "tokens_per_s": 1.0,
               "cuda_max_memory_allocated_mib": 2.0}
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": {"llama8b@2048": run}}))

    train("train_gpu_2048", 0.31)
    train("train_gpu_8192", 0.39)
    train("train_gpu_2048x4", 0.5, device="cpu")  # a CPU run is never counted as meeting a GPU target
    sbs = {"paired_ratios": {"ours/public": {"median": 1.6, "min": 1.55, "max": 1.7, "per_repeat": [1.55, 1.7],
                                            "spread": 0.09}},
           "variants": {"ours": {"tokens_per_s_median": 16.0, "cuda_peak_mib": 10.0},
                        "public": {"tokens_per_s_median": 10.0, "cuda_peak_mib": 20.0}}}
    (tmp_path / "side_by_side_llama8b_gpu.json").write_text(json.dumps(sbs))
    rows = gpu_targets.evaluate(tmp_path)["rows"]
    assert [r["met"] for r in rows] == [True, None, False, True]
    assert "1.60x" in gpu_targets.render(gpu_targets.evaluate(tmp_path))
    empty = tmp_path / "none"
    empty.mkdir()
    assert all(r["met"] is None for r in gpu_targets.evaluate(empty)["rows"])


def test_wheel_pack_round_trip(tmp_path):
    import zipfile

    from wheel_pack import pack, unpack

    src = tmp_path / "wheels"
    src.mkdir()
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/lib.so": bytes(range(256)) * 64,
             "pkg-1.0.dist-info/RECORD": b"pkg/__init__.py,,\n"}
    with zipfile.ZipFile(src / "pkg-1.0-py3-none-any.whl", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    pack(src, tmp_path / "w.tar.xz")
    (out,) = unpack(tmp_path / "w.tar.xz", tmp_path / "back")
    assert out.name == "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(out) as z:
        assert {n: z.read(n) for n in z.namelist()} == files


def test_run_sh_gpu_path_on_the_cpu(tmp_path):
    """`bench/run.sh --gpu`'s training part, run tiny on the CPU: the three step benchmarks
    (2048, 2048 x 4 rows, 8192 at the GPU shape), their profiler traces and the targets table."""
    import os
    import subprocess

    results = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable, BENCH_RESULTS_DIR=str(results), BENCH_GPU_SHAPE="tiny",
               BENCH_GPU_SEQS="32 64 4", OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(BENCH / "run.sh"), "--gpu", "--only", "train"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, rows, seq in (("train_gpu_2048", 1, 32), ("train_gpu_2048x4", 4, 32), ("train_gpu_8192", 1, 64)):
        (entry,) = json.loads((results / f"{name}.json").read_text())["runs"].values()
        assert (entry["rows"], entry["seq_len"], entry["tokens_per_step"]) == (rows, seq, rows * seq)
    traces = sorted(p.name for p in (results / "traces").iterdir())
    assert traces == ["train_gpu_2048_tiny.json.gz", "train_gpu_8192_tiny.json.gz"]
    assert "| MFU tiny@32 (1 row(s)/step) |" in run.stdout and "not run" in run.stdout  # no side by side asked


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
