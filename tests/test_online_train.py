"""Online training against the local vLLM-protocol server gives the offline loss curve.

The stand-in server (tests/support/hs_server.py) is used because it computes hidden states with the
transformers backend bit for bit, so the loss curves can be compared exactly and requests
counted; against the real engine (tests/test_real_vllm.py) they agree to bf16 rounding."""

import json

import pytest

from speculators.cli import main
from speculators.datagen.runner import DatagenConfig, run_datagen

from tests.support.hs_server import HiddenStatesTestServer, make_prepared_dataset

LAYERS = [2, 4, 5, 8]


def _losses(save_path):
    recs = [json.loads(l) for l in (save_path / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["type"], r["step"], r["metrics"]["loss"]) for r in recs if r["type"] in ("train", "val")]


@pytest.mark.slow
def test_online_and_hybrid_training_match_offline(tiny_llama, tmp_path):
    prepared = make_prepared_dataset(tmp_path / "prepared", tiny_llama, num_samples=10, min_len=20, max_len=48)
    offline = tmp_path / "offline"
    run_datagen(DatagenConfig(target_model_path=str(tiny_llama), train_data_path=str(prepared),
                              output_dir=str(offline), batch_size=1, device="cpu"))
    common = ["train", "--verifier-name-or-path", str(tiny_llama), "--epochs", "2", "--total-seq-len", "96",
              "--device", "cpu", "--ttt-steps", "2", "--lr", "3e-3", "--train-data-ratio", "0.8"]
    assert main([*common, "--data-path", str(offline), "--save-path", str(tmp_path / "s_off")]) == 0
    with HiddenStatesTestServer(tiny_llama, tmp_path / "vllm_out", LAYERS) as server:
        assert main([*common, "--vllm-endpoint", server.url, "--prepared-data", str(prepared),
                     "--save-path", str(tmp_path / "s_on"), "--prefetch", "4"]) == 0
        online_requests = server.completions_served
        assert main([*common, "--vllm-endpoint", server.url, "--prepared-data", str(prepared),
                     "--on-generate", "cache", "--hidden-states-path", str(tmp_path / "cache"),
                     "--save-path", str(tmp_path / "s_hyb")]) == 0
        hybrid_requests = server.completions_served - online_requests
    off = _losses(tmp_path / "s_off")
    assert len(off) >= 4
    assert _losses(tmp_path / "s_on") == off
    assert _losses(tmp_path / "s_hyb") == off
    # delete mode asks again every epoch; cache mode asks once per sample, then reads the disk
    # (+1: the start-up probe for the server's layer ids, since no --vllm-layer-ids is given)
    assert online_requests > hybrid_requests == 10 + 1
    assert len(list((tmp_path / "cache").glob("data_*.pt"))) == 10
