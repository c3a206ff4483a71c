"""The vllm datagen backend's managed-server lifecycle (start, files, cleanup).

The stand-in `vllm` (tests/support/hs_server.py) is used here because this path starts its own
server: with the real engine that is another 2-3 minutes of CI per test. The real engine's
hidden states against the transformers backend's: tests/test_real_vllm.py.
"""

import pytest

from speculators.data import data_config as _data_config
import torch

from speculators.datagen.base import GeneratorSpec
from speculators.datagen.runner import DatagenConfig, run_datagen
from speculators.datagen.vllm_backend import server_args

from tests.support.hs_server import make_prepared_dataset, write_fake_vllm


def test_server_args_carry_engine_options_and_passthrough():
    spec = GeneratorSpec(model_path="m", layer_ids=[1, 2], tensor_parallel_size=4, gpu_memory_utilization=0.7,
                         max_model_len=4096, extra_args=["--max-num-seqs", "128"])
    args = server_args(spec, 9000)
    assert args[:2] == ["--port", "9000"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.7"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert args[-2:] == ["--max-num-seqs", "128"]


@pytest.mark.slow
def test_vllm_backend_matches_transformers_backend(tiny_llama, tmp_path, monkeypatch):
    prepared = make_prepared_dataset(tmp_path / "prepared", tiny_llama, num_samples=5)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("SPECULATORS_VLLM_BIN", str(write_fake_vllm(tmp_path / "bin")))
    common = dict(target_model_path=str(tiny_llama), train_data_path=str(prepared), batch_size=1)
    ref = run_datagen(DatagenConfig(output_dir=str(tmp_path / "hf"), backend="transformers", device="cpu", **common))
    got = run_datagen(DatagenConfig(output_dir=str(tmp_path / "vllm"), backend="vllm", batch_size=3,
                                    **{k: v for k, v in common.items() if k != "batch_size"}))
    assert ref.generated == got.generated == 5
    for i in range(5):
        a = torch.load(tmp_path / "hf" / f"data_{i}.pt", weights_only=True)
        b = torch.load(tmp_path / "vllm" / f"data_{i}.pt", weights_only=True)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        assert len(b["hidden_states"]) == 4
        for x, y in zip(a["hidden_states"], b["hidden_states"]):
            assert torch.equal(x, y)
    import json

    cfg = _data_config.load(tmp_path / "vllm" / "data_config.json")
    assert cfg["backend"]["name"] == "vllm" and cfg["backend"]["managed_server"] is True
