"""--data-format-version 0|1 (train, eval, convert-data), data_config.json in the seeds'
structure with the first version still loading, and datagen preparing a source itself.

The version-0 files are written here by hand from version-1 files (the older layout as the
seeds describe it: `hidden_state` = the aux layers concatenated, `target` = the final layer),
not by any function of the package, so the readers are checked against an independent copy.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from speculators.cli import main as cli_main
from speculators.config.datagen import DatagenConfig
from speculators.data import data_config
from speculators.data.dataset import Eagle3Dataset
from speculators.data.formats import DataFormatVersionError, open_sample_store
from speculators.data.prepare import PrepareConfig, load_prepared, prepare_data
from speculators.datagen.runner import run_datagen
from speculators.errors import UserError
from speculators.train.metrics_stream import read_metrics

from tests.support.chat_data import write_qa_chats
from tests.support.synthetic import write_synthetic_hidden_states

CHATS = [
    [("What is 2+2?", "4, of course."), ("And 3+3?", "That is 6.")],
    [("Name a colour", "Blue is a colour that many people like.")],
    [("Write a haiku about rain", "Soft rain on the roof / the garden drinks quietly")],
    [("hi", "hello")],
    [("Count to five", "one two three four five")],
]


@pytest.fixture(scope="module")
def v1_dir(tiny_llama, tmp_path_factory):
    return write_synthetic_hidden_states(tiny_llama, tmp_path_factory.mktemp("v1"), num_samples=8, seq_len=24)


def write_v0_copy(v1: Path, v0: Path) -> Path:
    """The older layout, by hand: one dict per file with exactly the four documented keys."""
    v0.mkdir(parents=True)
    for path in sorted(v1.glob("data_*.pt")):
        s = torch.load(path, weights_only=True)
        torch.save({"input_ids": s["input_ids"], "loss_mask": s["loss_mask"],
                    "hidden_state": torch.cat(s["hidden_states"][:-1], dim=-1),
                    "target": s["hidden_states"][-1]}, v0 / path.name)
    return v0


@pytest.fixture(scope="module")
def v0_dir(v1_dir, tmp_path_factory):
    return write_v0_copy(v1_dir, tmp_path_factory.mktemp("v0") / "data")


def test_version_0_reads_the_same_training_tensors_as_version_1(v0_dir, v1_dir):
    a = Eagle3Dataset(open_sample_store(v1_dir, data_format_version=1), max_len=64)
    b = Eagle3Dataset(open_sample_store(v0_dir, data_format_version=0), max_len=64)
    assert len(a) == len(b) == 8
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert set(x) == set(y)
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), (i, key)
    s = torch.load(v0_dir / "data_0.pt", weights_only=True)
    assert b[0]["hidden_states"].shape[-1] == s["hidden_state"].shape[-1]  # [L-1, 3H], aux concatenated
    assert torch.equal(b[0]["verifier_last_hidden_states"], s["target"][1:])


def test_train_with_either_version_gives_the_same_run(tiny_llama, v0_dir, v1_dir, tmp_path):
    common = ["train", "--verifier-name-or-path", str(tiny_llama), "--epochs", "1", "--lr", "3e-3",
              "--total-seq-len", "96", "--ttt-steps", "2", "--device", "cpu"]
    assert cli_main([*common, "--data-path", str(v1_dir), "--save-path", str(tmp_path / "r1")]) == 0
    assert cli_main([*common, "--data-path", str(v0_dir), "--save-path", str(tmp_path / "r0"),
                     "--data-format-version", "0"]) == 0
    losses = [[r["metrics"]["loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["type"] == "train"]
              for run in ("r1", "r0")]
    assert losses[0] and losses[0] == losses[1]


def test_a_file_in_the_other_layout_is_refused_naming_it_and_its_keys(tiny_llama, v0_dir, v1_dir, tmp_path, capsys):
    with pytest.raises(DataFormatVersionError) as exc:
        open_sample_store(v1_dir, data_format_version=0)
    msg = str(exc.value)
    assert "data_0.pt" in msg and "'hidden_states'" in msg and "--data-format-version 1" in msg
    with pytest.raises(DataFormatVersionError) as exc:
        open_sample_store(v0_dir, data_format_version=1)
    msg = str(exc.value)
    assert "data_0.pt" in msg and "['hidden_state', 'input_ids', 'loss_mask', 'target']" in msg
    assert "--data-format-version 0" in msg
    rc = cli_main(["train", "--verifier-name-or-path", str(tiny_llama), "--data-path", str(v0_dir),
                   "--save-path", str(tmp_path / "x"), "--device", "cpu"])
    assert rc == 2 and "found keys ['hidden_state', 'input_ids', 'loss_mask', 'target']" in capsys.readouterr().err
    # a bad file later in the directory is refused too, not skipped as "corrupt"
    mixed = write_v0_copy(v1_dir, tmp_path / "mixed")
    torch.save({"input_ids": torch.zeros(3, dtype=torch.long), "hidden_states": []}, mixed / "data_5.pt")
    store = open_sample_store(mixed, data_format_version=0)
    with pytest.raises(DataFormatVersionError, match="data_5.pt"):
        [store.load(i) for i in range(len(store))]
    with pytest.raises(SystemExit) as exc:  # argparse: choose from 0, 1
        cli_main(["train", "--verifier-name-or-path", str(tiny_llama), "--data-path", str(v1_dir),
                  "--save-path", str(tmp_path / "y"), "--data-format-version", "2"])
    assert exc.value.code == 2 and "choose from 0, 1" in capsys.readouterr().err


def test_eval_and_convert_data_read_version_0(tiny_llama, v0_dir, v1_dir, tmp_path):
    from speculators.evaluate.runner import load_prompts

    p1 = load_prompts(v1_dir, str(tiny_llama), data_format_version=1)
    p0 = load_prompts(v0_dir, str(tiny_llama), data_format_version=0)
    ref = []
    for path in sorted(v1_dir.glob("data_*.pt"), key=lambda p: int(p.stem.split("_")[1])):
        s = torch.load(path, weights_only=True)
        ref.append(s["input_ids"][: s["loss_mask"].tolist().index(1)].tolist())
    assert p1 == p0 == ref
    # convert-data: version 0 -> version 1, sample for sample what the v1 directory holds
    out = tmp_path / "upgraded"
    assert cli_main(["convert-data", "--data-path", str(v0_dir), "--output-dir", str(out), "--to", "pt",
                     "--data-format-version", "0"]) == 0
    for path in v1_dir.glob("data_*.pt"):
        a, b = torch.load(path, weights_only=True), torch.load(out / path.name, weights_only=True)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        assert all(torch.equal(x, y) for x, y in zip(a["hidden_states"], b["hidden_states"]))
    assert data_config.load(out / "data_config.json")["format"] == "pt"
    assert cli_main(["convert-data", "--data-path", str(v0_dir), "--output-dir", str(tmp_path / "st"),
                     "--data-format-version", "0"]) == 0
    st = open_sample_store(tmp_path / "st")
    assert torch.equal(st.load(0)["hidden_states"][-1], torch.load(v0_dir / "data_0.pt", weights_only=True)["target"])


# ------------------------------------------------------------------ data_config.json

# The seeds' example data_config.json (004: data_generation_offline.py), its key paths.
SEED_KEY_PATHS = [
    "version", "generated_at", "speculators_version",
    "reproducibility.command", "reproducibility.package_versions", "reproducibility.gpu",
    "model.target_model_path", "model.tensor_parallel_size", "model.max_model_len",
    "model.gpu_memory_utilization", "model.hidden_size",
    "data.train_data_path", "data.seq_length", "data.max_samples", "data.num_samples", "data.seed",
    "data.chat_template_note",
    "hidden_states.layer_ids", "hidden_states.description",
    "generation.cache_dir",
    "format.file_pattern", "format.data_format_version",
    "format.schema.input_ids.dtype", "format.schema.input_ids.shape", "format.schema.input_ids.description",
    "format.schema.hidden_states.dtype", "format.schema.hidden_states.shape",
    "format.schema.hidden_states.num_tensors", "format.schema.hidden_states.description",
    "format.schema.loss_mask.dtype", "format.schema.loss_mask.shape", "format.schema.loss_mask.description",
]


def _get(d, dotted):
    for part in dotted.split("."):
        assert isinstance(d, dict) and part in d, dotted
        d = d[part]
    return d


def _chats_jsonl(path: Path) -> Path:
    return write_qa_chats(path, CHATS)


def test_datagen_prepares_a_source_itself_and_reuses_the_cached_copy(tiny_llama, tmp_path, monkeypatch):
    chats = _chats_jsonl(tmp_path / "chats.jsonl")
    cache = tmp_path / "cache"
    cfg = dict(target_model_path=str(tiny_llama), batch_size=2, device="cpu", max_samples=4)
    run_datagen(DatagenConfig(train_data_path=str(chats), output_dir=str(tmp_path / "a"), seq_length=40,
                              cache_dir=str(cache), **cfg))
    copies = sorted(cache.glob("prepared-*"))
    assert len(copies) == 1 and (copies[0] / "token_freq.pt").is_file()
    # the same as preparing by hand with prepare-data, then datagen from that directory
    prepare_data(PrepareConfig(model=str(tiny_llama), data=str(chats), output=str(tmp_path / "prep"),
                               seq_length=40, max_samples=4))
    run_datagen(DatagenConfig(train_data_path=str(tmp_path / "prep"), output_dir=str(tmp_path / "b"), **cfg))
    names = sorted(p.name for p in (tmp_path / "a").glob("data_*.pt"))
    assert names == sorted(p.name for p in (tmp_path / "b").glob("data_*.pt")) and len(names) == 4
    for name in names:
        x, y = (torch.load(tmp_path / d / name, weights_only=True) for d in "ab")
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["loss_mask"], y["loss_mask"])
    # token_freq.pt beside data_config.json: counts of the loss-masked tokens, counted here
    rows = load_prepared(tmp_path / "prep")
    want = Counter(t for ids, m in zip(rows["input_ids"], rows["loss_mask"]) for t, k in zip(ids, m) if k)
    for d in "ab":
        assert torch.load(tmp_path / d / "token_freq.pt", weights_only=True) == dict(want)
    # a rerun does not tokenize again: prepare-data's collection step would fail if it ran
    import speculators.data.prepare as prepare_mod

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(prepare_mod, "_collect", no_tokenizing)
    run_datagen(DatagenConfig(train_data_path=str(chats), output_dir=str(tmp_path / "c"), seq_length=40,
                              cache_dir=str(cache), **cfg))
    assert sorted(cache.glob("prepared-*")) == copies
    with pytest.raises(AssertionError, match="tokenized again"):  # another --seq-length is another copy
        run_datagen(DatagenConfig(train_data_path=str(chats), output_dir=str(tmp_path / "d"), seq_length=32,
                                  cache_dir=str(cache), **cfg))
    # the seeds' structure, with what our readers need
    raw = json.loads((tmp_path / "a" / "data_config.json").read_text())
    for key in SEED_KEY_PATHS:
        _get(raw, key)
    assert raw["version"] == "2.0" and raw["format"]["data_format_version"] == 1
    assert raw["format"]["file_pattern"] == "data_{idx}.pt"
    assert raw["data"]["train_data_path"] == str(chats) and raw["data"]["seq_length"] == 40
    assert raw["data"]["num_samples"] == 4 and raw["data"]["max_samples"] == 4 and raw["data"]["seed"] == 0
    assert raw["hidden_states"]["layer_ids"] == [2, 4, 5, 8] and raw["model"]["hidden_size"] == 64
    assert raw["generation"]["cache_dir"] == str(cache)
    assert raw["format"]["schema"]["hidden_states"]["num_tensors"] == 4
    assert "--train-data-path=" in raw["reproducibility"]["command"]
    assert "torch" in raw["reproducibility"]["package_versions"]


def test_token_freq_path_copy_is_never_overwritten_with_other_counts(tiny_llama, tmp_path):
    chats = _chats_jsonl(tmp_path / "chats.jsonl")
    cfg = dict(target_model_path=str(tiny_llama), batch_size=2, device="cpu", seq_length=40,
               cache_dir=str(tmp_path / "cache"))
    freq = tmp_path / "token_freq.pt"
    run_datagen(DatagenConfig(train_data_path=str(chats), output_dir=str(tmp_path / "a"), max_samples=2,
                              token_freq_path=str(freq), **cfg))
    assert torch.load(freq, weights_only=True) == torch.load(tmp_path / "a" / "token_freq.pt", weights_only=True)
    before = freq.read_bytes()
    with pytest.raises(UserError, match="holds other token counts"):
        run_datagen(DatagenConfig(train_data_path=str(chats), output_dir=str(tmp_path / "b"), max_samples=5,
                                  token_freq_path=str(freq), **cfg))
    assert freq.read_bytes() == before and not list((tmp_path / "b").glob("data_*.pt"))


def test_a_prepared_directory_with_another_seq_length_is_refused(tiny_llama, tmp_path):
    prep = tmp_path / "prep"
    prepare_data(PrepareConfig(model=str(tiny_llama), data=str(_chats_jsonl(tmp_path / "c.jsonl")),
                               output=str(prep), seq_length=40))
    with pytest.raises(UserError, match="prepared with --seq-length 40"):
        run_datagen(DatagenConfig(target_model_path=str(tiny_llama), train_data_path=str(prep),
                                  output_dir=str(tmp_path / "o"), seq_length=64, device="cpu"))


def test_a_first_version_data_config_still_loads_and_resumes(tiny_llama, v1_dir, tmp_path):
    """A directory written before the change (flat data_config.json, version 1): training reads
    it, and a datagen rerun into it accepts it as its own."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(v1_dir, old)
    flat = {"version": 1, "format": "pt", "generated_at": "2026-11-20T10:00:00Z",
            "packages": {"torch": "2.13.0"}, "model": str(tiny_llama),
            "data": {"path": "/somewhere/prepared", "fingerprint": None},
            "layer_ids": [2, 4, 5, 8], "hidden_size": 64, "num_hidden_layers": 8, "hidden_states_dtype": "bfloat16",
            "schema": {"input_ids": "LongTensor[L]"}, "complete": True, "num_samples": 8,
            "lengths": {str(i): 24 for i in range(8)}}
    (old / "data_config.json").write_text(json.dumps(flat))
    store = open_sample_store(old)
    assert store.config["layer_ids"] == [2, 4, 5, 8] and store.lengths() == [24] * 8
    assert cli_main(["train", "--verifier-name-or-path", str(tiny_llama), "--data-path", str(old),
                     "--save-path", str(tmp_path / "run"), "--epochs", "1", "--total-seq-len", "96",
                     "--device", "cpu"]) == 0
    assert data_config.flatten(flat) == flat
    # the two directions of the mapping agree
    nested = data_config.nest(flat)
    assert nested["version"] == "2.0" and nested["model"]["target_model_path"] == str(tiny_llama)
    back = data_config.flatten(nested)
    assert {k: back[k] for k in flat} == flat
