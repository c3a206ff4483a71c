"""Hidden states in the public speculators package's layout, checked against the real package.

The public side runs in its own venv (fixture `public_speculators_python`): its trainer's
ArrowDataset reads what `convert-data --to public` writes, and a directory written with
its own dataset code is read by our stores, converted to ours and trained on directly.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from speculators.cli import main as cli
from speculators.data.dataset import Eagle3Dataset
from speculators.data.formats import PtSampleStore, open_sample_store
from speculators.data.public_format import PublicSampleStore

from tests.support.public_pkg import run_public
from tests.support.synthetic import write_synthetic_hidden_states


def _public_view(sample):
    """What the public ArrowDataset yields for one raw sample (aux layers flattened, last apart)."""
    return {
        "hidden_states": torch.cat(sample["hidden_states"][:-1], dim=-1),
        "verifier_last_hidden_states": sample["hidden_states"][-1],
        "input_ids": sample["input_ids"],
        "loss_mask": sample["loss_mask"],
    }


def _assert_same(ours, theirs, i):
    for key, value in _public_view(ours).items():
        other = theirs[f"{i}.{key}"]
        assert torch.equal(value.to(other.dtype), other), f"sample {i}: {key} differs"


def test_both_directions_against_the_public_package(tiny_llama, public_speculators_python, tmp_path, capsys):
    ours = write_synthetic_hidden_states(tiny_llama, tmp_path / "ours", num_samples=5, seq_len=20)
    assert cli(["convert-data", "--data-path", str(ours), "--output-dir", str(tmp_path / "ours_public"),
                "--to", "public"]) == 0
    dump = tmp_path / "dump"
    dump.mkdir()
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(tiny_llama)
    run_public(public_speculators_python, "hidden_states_io.py", tmp_path / "ours_public", tmp_path / "theirs",
               dump, conf.hidden_size, conf.vocab_size)

    # ours -> public: the public trainer reads every sample exactly as ours holds it.
    src = PtSampleStore(ours)
    read_by_public = load_file(str(dump / "read_by_public.safetensors"))
    assert len({k.split(".")[0] for k in read_by_public}) == len(src) == 5
    for i in range(len(src)):
        _assert_same(src.load(i), read_by_public, i)

    # public -> ours: detected and read directly, sample for sample as the public trainer reads it.
    written = load_file(str(dump / "public_written.safetensors"))
    store = open_sample_store(tmp_path / "theirs")
    assert isinstance(store, PublicSampleStore) and len(store) == 3
    assert store.lengths() == [12, 20, 9]
    for i in range(3):
        _assert_same(store.load(i), written, i)
    store.check_verifier(hidden_size=conf.hidden_size, num_layers=4)
    items = Eagle3Dataset.from_path(tmp_path / "theirs")
    assert items[1]["hidden_states"].shape == (19, 3 * conf.hidden_size)

    # ... and converted to our pt layout (the layer ids must be named: the public layout has none).
    assert cli(["convert-data", "--data-path", str(tmp_path / "theirs"), "--output-dir", str(tmp_path / "no_ids"),
                "--to", "pt"]) == 2
    assert "--layer-ids" in capsys.readouterr().err
    assert cli(["convert-data", "--data-path", str(tmp_path / "theirs"), "--output-dir", str(tmp_path / "back"),
                "--to", "pt", "--layer-ids", "2,4,5,8", "--num-hidden-layers", "8"]) == 0
    back = open_sample_store(tmp_path / "back")
    assert isinstance(back, PtSampleStore) and back.config["layer_ids"] == [2, 4, 5, 8]
    for i in range(3):
        _assert_same(back.load(i), written, i)
    assert cli(["convert-data", "--data-path", str(tmp_path / "theirs"), "--output-dir", str(tmp_path / "shards"),
                "--to", "safetensors", "--layer-ids", "2,4,5,8"]) == 0
    shards = open_sample_store(tmp_path / "shards")
    for i in range(3):
        _assert_same(shards.load(i), written, i)

    # Eval takes the public directory as held-out prompts (the tokens before each row's first trained one).
    from speculators.evaluate.runner import prompts_from_prepared

    assert prompts_from_prepared(tmp_path / "theirs") == [s["input_ids"][: s["loss_mask"].tolist().index(1)].tolist()
                                                         for s in (store.load(i) for i in range(3))]

    # Our trainer trains on the public layout directly.
    from speculators.config.train import TrainConfig
    from speculators.train.trainer import run_training

    run_training(TrainConfig(verifier_name_or_path=str(tiny_llama), data_path=str(tmp_path / "theirs"),
                             save_path=str(tmp_path / "run"), epochs=1, lr=1e-3, total_seq_len=64, ttt_steps=2,
                             log_freq=1000, warmup_steps=1, num_layers=1))
    assert any((tmp_path / "run").rglob("model.safetensors"))


def test_public_layout_problems_are_clear(tmp_path):
    import datasets
    from safetensors.torch import save_file

    from speculators.errors import UserError

    d = tmp_path / "pub"
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6]], "loss_mask": [[0, 1, 1], [0, 1, 1]],
                                "seq_len": [3, 3]}).save_to_disk(str(d))
    (d / "hidden_states").mkdir()
    save_file({"hidden_states": torch.zeros(3, 2, 4), "token_ids": torch.tensor([1, 2, 3])},
              str(d / "hidden_states" / "hs_0.safetensors"))
    save_file({"hidden_states": torch.zeros(3, 2, 4), "token_ids": torch.tensor([9, 9, 9])},
              str(d / "hidden_states" / "hs_1.safetensors"))
    store = open_sample_store(d, on_corrupt="raise")
    assert len(store) == 2 and store.load(0)["input_ids"].tolist() == [1, 2, 3]
    import pytest

    with pytest.raises(UserError, match="token_ids differ from row 1"):
        store.load(1)
    with pytest.raises(UserError, match="hidden_states: hidden_size 4 does not match the verifier's 8"):
        store.check_verifier(hidden_size=8)
