"""bench/capacity.py: the capacity plan's formulas against hand-computed cases, and its report
built from the measured figures in bench/results (docs/scaling.md, "Capacity plan")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def cap(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import capacity

    return capacity


def test_bytes_per_token_by_hand_and_as_the_project_stores(cap):
    from speculators.data.hs_quant import bytes_per_token

    assert cap.hs_bytes_per_token(4096, 4, "bf16") == 4096 * 2 * 4 == 32_768
    assert cap.hs_bytes_per_token(4096, 4, "fp8") == (4096 + 4) * 4 == 16_400
    assert cap.hs_bytes_per_token(128, 4, "fp8") == 528  # fp8_acceptance.json payload figure
    for h, k in ((64, 1), (128, 4), (4096, 4), (5120, 3)):
        for s in ("bf16", "fp8"):
            assert cap.hs_bytes_per_token(h, k, s) == bytes_per_token(h, k, s)
    with pytest.raises(ValueError):
        cap.hs_bytes_per_token(4096, 4, "fp16")


def test_prefill_estimate_by_hand(cap):
    v = cap.Verifier("x", params=1e9, hidden_size=1000, num_layers=10)
    # 2 x 1e9 + 2 x 10 layers x 100 tokens x 1000 = 2.002e9 FLOP/token
    assert cap.prefill_flops_per_token(v, 100) == pytest.approx(2.002e9)
    # 50% of 100 TFLOP/s over 2.002e9 FLOP/token
    assert cap.estimated_prefill_tokens_per_s(v, 100, 100.0, 0.5) == pytest.approx(5e13 / 2.002e9)


def test_devices_and_hours_by_hand(cap):
    # 3600 samples/hour x 1000 tokens = 1000 tokens/s: 1 device at 1000 tokens/s, 2 at 999
    assert cap.devices_for_rate(3600, 1000, 1000.0) == 1
    assert cap.devices_for_rate(3600, 1000, 999.0) == 2
    assert cap.devices_for_rate(36_000, 1000, 2500.0) == 4
    assert cap.devices_for_rate(0, 1000, 1000.0) == 0
    # 7200 samples x 500 tokens x 3 passes / 1000 tokens/s = 10,800 s = 3 h
    assert cap.device_hours(7200, 500, 3, 1000.0) == pytest.approx(3.0)


def test_run_cost_offline_vs_online_by_hand(cap):
    # 1000 samples x 3600 tokens, 5 epochs; verifier 1000 tokens/s (1 h per pass), trainer 500 (2 h per epoch)
    off = cap.run_cost("offline", 1000, 3600, 5, 1000.0, 500.0, 10.0)
    on = cap.run_cost("online", 1000, 3600, 5, 1000.0, 500.0, 10.0)
    assert (off.verifier_gpu_h, off.trainer_gpu_h, off.stored_bytes) == pytest.approx((1.0, 10.0, 3.6e7))
    assert (on.verifier_gpu_h, on.trainer_gpu_h, on.stored_bytes) == pytest.approx((5.0, 10.0, 0.0))
    assert on.gpu_h - off.gpu_h == pytest.approx(4.0)
    # 4 GPU-h saved over 3.6e7 bytes = 3.6e-5 TB
    assert cap.break_even_gpu_h_per_tb(1000, 3600, 5, 1000.0, 10.0) == pytest.approx(4.0 / 3.6e-5)
    assert cap.break_even_gpu_h_per_tb(1000, 3600, 1, 1000.0, 10.0) == 0.0
    assert cap.read_bandwidth_bytes_per_s(500.0, 10.0) == 5000.0
    with pytest.raises(ValueError):
        cap.run_cost("hybrid", 1, 1, 1, 1.0, 1.0, 1.0)


def test_figures_come_from_the_result_files(cap):
    f = cap.measured_figures()
    t2 = json.loads((BENCH / "results" / "train_gpu_2048.json").read_text())
    assert f.train_8b_2048.value == t2["runs"]["llama8b@2048"]["tokens_per_s"]
    assert f.train_8b_2048.source.startswith("measured:") and "H200" in f.train_8b_2048.source
    on = json.loads((BENCH / "results" / "online.json").read_text())
    assert f.train_demo_cpu.value == on["trainer"]["tokens_per_s_median"]
    # the measured on-disk bytes/token of bf16 shards is the payload plus < 0.1% of headers
    assert f.disk_bpt_h4096.value == pytest.approx(cap.hs_bytes_per_token(4096, 4, "bf16"), rel=1e-3)


def test_report_tables(cap):
    text = cap.report(samples=500_000, seq_len=2048, epochs=4)
    # every figure row names its source as measured, estimated or computed
    figure_rows = [line for line in text.splitlines()
                   if line.startswith("| ") and any(f"| {k}:" in line for k in ("measured", "estimated", "computed"))]
    assert len(figure_rows) >= 9
    # storage for 500k x 2048 tokens at 32,768 B/token, in TB, as the doc quotes it
    tb = 500_000 * 2048 * 32_768 / 1e12
    assert f"| {tb:.1f} |" in text and math.isclose(tb, 33.554432)


def test_cli_prints_the_report(cap, capsys):
    cap.main()
    out = capsys.readouterr().out
    assert "## A run of 500,000 samples" in out and "When offline beats online" in out


def test_doc_shows_the_calculator_output(cap):
    """docs/scaling.md pastes `python bench/capacity.py` (headings one level down): rerun it and
    paste again when a result file or a formula changes."""
    doc = (BENCH.parent / "docs" / "scaling.md").read_text()
    for line in cap.report().splitlines():
        line = "#### " + line[3:] if line.startswith("## ") else line
        assert line in doc, line
