"""datagen: hidden states equal a direct transformers forward; resume; formats; bad layer ids."""

from __future__ import annotations

import json
import os

import pytest
import torch

from speculators.cli import main as cli_main
from speculators.data import data_config as _data_config
from speculators.data.dataset import Eagle3Collator, Eagle3Dataset
from speculators.data.formats import PtSampleStore, SafetensorsSampleStore, open_sample_store
from speculators.data.prepare import PrepareConfig, load_prepared, prepare_data
from speculators.datagen.base import create_generator
from speculators.datagen.runner import DatagenConfig, run_datagen
from speculators.errors import UserError
from speculators.layers import default_layer_ids, resolve_layer_ids

from tests.support.chat_data import write_qa_chats
from tests.support.interrupt import Killed

CHATS = [
    [("What is 2+2?", "4, of course."), ("And 3+3?", "That is 6.")],
    [("Name a colour", "Blue is a colour that many people like.")],
    [("Write a haiku about rain", "Soft rain on the roof / the garden drinks quietly / clouds move on at dusk")],
    [("hi", "hello")],
    [("Explain gravity briefly", "Mass attracts mass; the more mass, the stronger the pull."), ("thanks", "any time")],
    [("Count to five", "one two three four five")],
    [("Is water wet?", "It makes other things wet.")],
]


def prepared(model, tmp_path_factory, name):
    d = tmp_path_factory.mktemp(name)
    path = write_qa_chats(d / "chats.jsonl", CHATS)
    prepare_data(PrepareConfig(model=str(model), data=str(path), output=str(d / "prep"), seq_length=48))
    return d / "prep"


@pytest.fixture(scope="module")
def prep_llama(tiny_llama, tmp_path_factory):
    return prepared(tiny_llama, tmp_path_factory, "prep_llama")


@pytest.fixture(scope="module")
def prep_qwen3(tiny_qwen3, tmp_path_factory):
    return prepared(tiny_qwen3, tmp_path_factory, "prep_qwen3")


def direct_states(model_path, ids, layer_ids):
    """Reference: one unbatched forward with output_hidden_states, plus the last layer's output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    grabbed = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: grabbed.__setitem__("last", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    states = [out.hidden_states[i][0] if i < n else grabbed["last"][0] for i in layer_ids]
    # transformers' own hidden_states[n] is post-norm: norm(our final layer) must equal it.
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(grabbed["last"][0]), out.hidden_states[n][0])
    return states


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_hidden_states_equal_direct_forward(arch, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{arch}")
    prep = request.getfixturevalue(f"prep_{arch}")
    out = tmp_path / "hs"
    result = run_datagen(DatagenConfig(target_model_path=str(model), train_data_path=str(prep),
                                       output_dir=str(out), batch_size=3, device="cpu"))
    data = load_prepared(prep)
    assert result.generated == result.total == len(data)
    config = _data_config.load(out / "data_config.json")
    assert config["layer_ids"] == [2, 4, 5, 8] == default_layer_ids(8)
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 8 and config["version"] == 1
    assert config["complete"] and config["format"] == "pt"
    assert {"torch", "transformers"} <= set(config["packages"]) and "generated_at" in config
    assert "BEFORE the final norm" in config["layer_convention"]
    for i in (0, 2, len(data) - 1):
        sample = torch.load(out / f"data_{i}.pt", weights_only=True)
        assert sample["input_ids"].tolist() == data[i]["input_ids"]
        assert sample["loss_mask"].tolist() == data[i]["loss_mask"]
        ref = direct_states(model, data[i]["input_ids"], config["layer_ids"])
        assert len(sample["hidden_states"]) == 4
        for got, want in zip(sample["hidden_states"], ref):
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got, want.to(torch.bfloat16))


def test_layer_id_validation():
    assert resolve_layer_ids([1, 3], 8) == [1, 3, 8]
    assert resolve_layer_ids([1, 3, 8], 8) == [1, 3, 8]
    with pytest.raises(UserError, match=r"out of range.*\[0, 8\]"):
        resolve_layer_ids([1, 9], 8)
    with pytest.raises(UserError, match="duplicates"):
        resolve_layer_ids([1, 1], 8)
    with pytest.raises(UserError, match="ascending"):  # the final layer anywhere but last
        resolve_layer_ids([8, 1], 8)
    with pytest.raises(UserError, match="final layer"):
        resolve_layer_ids([1, 2], 8, include_last_layer=False)


def test_cli_layer_out_of_range_is_clear(tiny_llama, prep_llama, tmp_path, capsys):
    rc = cli_main(["datagen", "--target-model-path", str(tiny_llama), "--train-data-path", str(prep_llama),
                   "--output-dir", str(tmp_path / "hs"), "--layer-ids", "2", "12"])
    assert rc == 2
    assert "--layer-ids [12] out of range" in capsys.readouterr().err
    assert not (tmp_path / "hs" / "data_0.pt").exists()


def test_resume_after_interrupted_run(tiny_llama, prep_llama, tmp_path):
    out = tmp_path / "hs"
    cfg = DatagenConfig(target_model_path=str(tiny_llama), train_data_path=str(prep_llama),
                        output_dir=str(out), batch_size=2, device="cpu")
    calls = {"n": 0}

    def dying_factory(spec):
        gen = create_generator("transformers", spec)
        real = gen.generate

        def generate(batch):
            calls["n"] += 1
            if calls["n"] == 3:
                # A kill during a file write leaves a temp file behind: simulate that too.
                (out / ".data_99.pt.abc.tmp").write_bytes(b"half a file")
                raise Killed()
            return real(batch)

        gen.generate = generate
        return gen

    with pytest.raises(Killed):
        run_datagen(cfg, generator_factory=dying_factory)
    done = sorted(p.name for p in out.glob("data_*.pt"))
    assert len(done) == 4  # two full batches of 2
    for name in done:
        torch.load(out / name, weights_only=True)  # every finished file is whole
    assert not _data_config.load(out / "data_config.json")["complete"]

    result = run_datagen(cfg)
    total = len(load_prepared(prep_llama))
    assert (result.skipped_existing, result.generated, result.total) == (4, total - 4, total)
    assert not list(out.glob(".*.tmp"))
    assert _data_config.load(out / "data_config.json")["complete"]

    fresh = run_datagen(DatagenConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "fresh")}))
    assert fresh.generated == total
    for i in range(total):
        a = torch.load(out / f"data_{i}.pt", weights_only=True)
        b = torch.load(tmp_path / "fresh" / f"data_{i}.pt", weights_only=True)
        assert torch.equal(a["input_ids"], b["input_ids"])
        for x, y in zip(a["hidden_states"], b["hidden_states"]):
            torch.testing.assert_close(x, y)
    # A third run has nothing to do.
    assert run_datagen(cfg).generated == 0


def test_rerun_with_other_layers_refuses(tiny_llama, prep_llama, tmp_path):
    cfg = DatagenConfig(target_model_path=str(tiny_llama), train_data_path=str(prep_llama),
                        output_dir=str(tmp_path / "hs"), max_samples=2, device="cpu")
    run_datagen(cfg)
    with pytest.raises(UserError, match="layer_ids"):
        run_datagen(DatagenConfig(**{**cfg.__dict__, "layer_ids": [1, 3]}))


def test_safetensors_format_and_training_dataset(tiny_llama, prep_llama, tmp_path):
    common = dict(target_model_path=str(tiny_llama), train_data_path=str(prep_llama), batch_size=4,
                  device="cpu", layer_ids=[1, 3, 6])
    run_datagen(DatagenConfig(output_dir=str(tmp_path / "pt"), **common))
    rc = cli_main(["datagen", "--target-model-path", str(tiny_llama), "--train-data-path", str(prep_llama),
                   "--output-dir", str(tmp_path / "st"), "--layer-ids", "1", "3", "6", "--format",
                   "safetensors", "--device", "cpu"])
    assert rc == 0
    assert not (tmp_path / "st" / ".pt-staging").exists()
    pt = open_sample_store(tmp_path / "pt")
    st = open_sample_store(tmp_path / "st")
    for store in (pt, st):
        store.check_verifier(hidden_size=64, num_layers=4)
    assert isinstance(pt, PtSampleStore) and isinstance(st, SafetensorsSampleStore)
    assert len(pt) == len(st) == len(load_prepared(prep_llama))
    assert _data_config.load(tmp_path / "st" / "data_config.json")["layer_ids"] == [1, 3, 6, 8]
    for i in range(len(pt)):
        a, b = pt.load(i), st.load(i)
        assert torch.equal(a["input_ids"], b["input_ids"])
        for x, y in zip(a["hidden_states"], b["hidden_states"]):
            torch.testing.assert_close(x, y)
    # Rerunning the finished safetensors run is a no-op.
    assert run_datagen(DatagenConfig(output_dir=str(tmp_path / "st"), format="safetensors", **common)).generated == 0

    ds = Eagle3Dataset(st, max_len=32)
    batch = Eagle3Collator(total_seq_len=64)([ds[i] for i in range(len(ds))])
    assert batch["hidden_states"].shape[-1] == 3 * 64
    assert batch["verifier_last_hidden_states"].shape[-1] == 64
    assert int(batch["lengths"].sum()) == sum(ds.lengths())


def test_convert_data_cli(tiny_llama, prep_llama, tmp_path, capsys):
    run_datagen(DatagenConfig(target_model_path=str(tiny_llama), train_data_path=str(prep_llama),
                              output_dir=str(tmp_path / "pt"), max_samples=3, device="cpu"))
    os.truncate(tmp_path / "pt" / "data_1.pt", 100)  # corrupt one file
    rc = cli_main(["convert-data", "--data-path", str(tmp_path / "pt"), "--output-dir", str(tmp_path / "st")])
    assert rc == 0
    assert "2 samples" in capsys.readouterr().out
    assert open_sample_store(tmp_path / "st").sample_indices == [0, 2]
    rc = cli_main(["convert-data", "--data-path", str(tmp_path / "pt"), "--output-dir", str(tmp_path / "st2"),
                   "--on-corrupt", "raise"])
    assert rc == 2 and "data_1.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_real_sigkill_leaves_only_whole_files(tiny_llama, tmp_path):
    """Kill a real `speculators datagen` process mid-run, then resume it."""
    import signal
    import subprocess
    import sys
    import time

    prep = tmp_path / "prep"
    prepare_data(PrepareConfig(model=str(tiny_llama), data="sharegpt", output=str(prep), seq_length=128,
                               max_samples=150))
    out = tmp_path / "hs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "speculators", "datagen", "--target-model-path", str(tiny_llama),
         "--train-data-path", str(prep), "--output-dir", str(out), "--batch-size", "1", "--device", "cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("data_*.pt"))) >= 5:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it was killed mid-run, not finished
    done = list(out.glob("data_*.pt"))
    assert 0 < len(done) < 150
    for path in done:
        sample = torch.load(path, weights_only=True)  # no torn files under the final name
        assert len(sample["hidden_states"]) == 4
    result = run_datagen(DatagenConfig(target_model_path=str(tiny_llama), train_data_path=str(prep),
                                       output_dir=str(out), batch_size=16, device="cpu"))
    assert result.skipped_existing == len(done) and result.generated == 150 - len(done)
    assert len(list(out.glob("data_*.pt"))) == 150 and not list(out.glob(".*.tmp"))
