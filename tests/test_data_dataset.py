"""The training Dataset: EAGLE shift, packing, padding, both on-disk formats, corrupt files."""

from __future__ import annotations

import json
import warnings

import pytest

from speculators.atomic import atomic_write_json
from speculators.data import data_config as _data_config
import torch

from speculators.data.dataset import (
    Eagle3Collator,
    Eagle3Dataset,
    PackedBatchSampler,
    pack_rows,
    shift_sample,
    split_indices,
)
from speculators.data.formats import (
    PtSampleStore,
    SafetensorsSampleStore,
    convert_pt_to_safetensors,
    open_sample_store,
    write_pt_sample,
)
from speculators.data.sample_store import CorruptSampleError, SampleStore
from speculators.errors import UserError

H = 8
LAYERS = [2, 4, 5, 8]


def make_sample(length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (length,), generator=g),
        "hidden_states": [torch.randn(length, H, generator=g).to(torch.bfloat16) for _ in LAYERS],
        "loss_mask": torch.randint(0, 2, (length,), generator=g),
    }


def write_store(directory, lengths, start=0) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    samples = []
    for k, n in enumerate(lengths):
        s = make_sample(n, seed=k)
        write_pt_sample(directory, start + k, s)
        samples.append(s)
    atomic_write_json(
        directory / "data_config.json",
        {"version": 1, "format": "pt", "layer_ids": LAYERS, "hidden_size": H, "num_hidden_layers": 8},
    )
    return samples


def test_shift_matches_contract():
    s = make_sample(6, seed=1)
    out = shift_sample(s)
    L = 6
    assert torch.equal(out["input_ids"], s["input_ids"][1:])
    assert torch.equal(out["loss_mask"], s["loss_mask"][1:])
    assert torch.equal(out["position_ids"], torch.arange(1, L))
    assert out["hidden_states"].shape == (L - 1, 3 * H)
    for k in range(3):
        assert torch.equal(out["hidden_states"][:, k * H : (k + 1) * H], s["hidden_states"][k][:-1])
    assert torch.equal(out["verifier_last_hidden_states"], s["hidden_states"][-1][1:])


def test_shift_truncates_after_shift():
    out = shift_sample(make_sample(10, seed=2), max_len=4)
    assert out["length"] == 4
    assert all(v.shape[0] == 4 for k, v in out.items() if k != "length")
    assert torch.equal(out["position_ids"], torch.arange(1, 5))


def test_pack_rows_first_fit_and_overlong():
    assert pack_rows([5, 4, 3, 2], 8) == [[0, 2], [1, 3]]
    assert pack_rows([20, 1], 8) == [[0], [1]]


def test_collator_packs_with_document_ids():
    items = [shift_sample(make_sample(n, seed=n)) for n in (5, 4, 3)]  # shifted 4, 3, 2
    batch = Eagle3Collator(total_seq_len=8)(items)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["hidden_states"].shape == (2, 8, 3 * H)
    assert batch["verifier_last_hidden_states"].shape == (2, 8, H)
    # Row 0: doc 0 (4 tokens) + doc 1 (3 tokens) + 1 pad; row 1: doc 2 (2 tokens) + 6 pad.
    assert batch["document_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    assert batch["document_ids"][1].tolist() == [2, 2] + [-1] * 6
    assert batch["position_ids"][0].tolist() == [1, 2, 3, 4, 1, 2, 3, 0]
    assert torch.equal(batch["input_ids"][0, 4:7], items[1]["input_ids"])
    assert torch.equal(batch["hidden_states"][1, :2], items[2]["hidden_states"])
    pad = batch["document_ids"] == -1
    assert batch["loss_mask"][pad].sum() == 0 and batch["input_ids"][pad].sum() == 0
    assert batch["lengths"].tolist() == [4, 3, 2]


def test_collator_pad_mode_one_per_row():
    items = [shift_sample(make_sample(n, seed=n)) for n in (3, 6)]
    batch = Eagle3Collator(total_seq_len=6, pack=False)(items)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["document_ids"].tolist() == [[0, 0, -1, -1, -1, -1], [1] * 5 + [-1]]


def test_packed_batch_sampler_fills_rows_and_splits_ranks():
    lengths = [3, 5, 2, 7, 1, 4, 6, 2]
    sampler = PackedBatchSampler(lengths, total_seq_len=8, rows=2, shuffle=True, seed=3)
    seen = []
    for batch in sampler:
        assert len(pack_rows([lengths[i] for i in batch], 8)) <= 2
        seen.extend(batch)
    assert sorted(seen) == list(range(len(lengths)))
    sampler.set_epoch(1)
    r0 = list(PackedBatchSampler(lengths, 8, rows=1, seed=3, rank=0, world_size=2))
    r1 = list(PackedBatchSampler(lengths, 8, rows=1, seed=3, rank=1, world_size=2))
    assert len(r0) == len(r1)
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_split_indices_deterministic_and_disjoint():
    a, b = split_indices(20, 0.25, seed=1)
    assert len(b) == 5 and not set(a) & set(b) and sorted(a + b) == list(range(20))
    assert split_indices(20, 0.25, seed=1) == (a, b)


def test_pt_store_and_dataset_end_to_end(tmp_path):
    samples = write_store(tmp_path / "d", [6, 4, 9])
    ds = Eagle3Dataset.from_path(tmp_path / "d", max_len=16)
    assert len(ds) == 3 and ds.lengths() == [5, 3, 8]
    item = ds[2]
    assert torch.equal(item["input_ids"], samples[2]["input_ids"][1:])
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=PackedBatchSampler(ds.lengths(), 16, rows=1, shuffle=False),
        collate_fn=Eagle3Collator(16),
    )
    batches = list(loader)
    assert sum(int(b["lengths"].sum()) for b in batches) == 16


def test_store_validates_against_verifier(tmp_path):
    """`check_verifier` is the one dimension check: each recorded value against the verifier's."""
    write_store(tmp_path / "d", [4])  # hidden_size 8, num_hidden_layers 8, layer ids 2,4,5,8
    store = open_sample_store(tmp_path / "d")
    store.check_verifier(hidden_size=H, num_hidden_layers=8, num_layers=4)  # the matching verifier
    config = str(tmp_path / "d" / "data_config.json")
    with pytest.raises(UserError, match=f"{config}: hidden_size 8 does not match the verifier's 9"):
        store.check_verifier(hidden_size=H + 1)
    with pytest.raises(UserError, match="num_hidden_layers 8 does not match the verifier's 12"):
        store.check_verifier(hidden_size=H, num_hidden_layers=12)
    with pytest.raises(UserError, match=r"stores 4 layers \[2, 4, 5, 8\], the draft model expects 3"):
        store.check_verifier(num_layers=3)
    with pytest.raises(UserError, match="data_config.json"):
        open_sample_store(tmp_path / "missing")


def test_verifier_check_applies_the_layer_id_rules(tmp_path):
    write_store(tmp_path / "d", [4])
    config = json.loads((tmp_path / "d" / "data_config.json").read_text())
    config.pop("num_hidden_layers")  # recorded by datagen; older data may lack it
    atomic_write_json(tmp_path / "d" / "data_config.json", config)
    store = open_sample_store(tmp_path / "d")
    with pytest.raises(UserError, match="layer_ids"):  # layer 8 is past a 6-layer verifier's final layer
        store.check_verifier(hidden_size=H, num_hidden_layers=6)
    store.config = {"hidden_size": H, "num_layers": 3}  # version-0 data without layer ids
    with pytest.raises(UserError, match="names no layer ids"):
        store.check_verifier(hidden_size=H, num_hidden_layers=8)
    store.check_verifier(hidden_size=H)  # without the verifier's layer count nothing else is checked


class _CountingStore(SampleStore):
    """Only what the protocol requires; counts the loads."""

    def __init__(self, lengths):
        self.samples = [make_sample(n, seed=n) for n in lengths]
        self.loads = 0

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        self.loads += 1
        return self.samples[i]


def test_a_store_with_only_len_and_load_gets_the_protocol_defaults():
    store = _CountingStore([6, 3, 9])
    assert store.lengths() == [6, 3, 9] and store.loads == 3  # read from the samples
    assert Eagle3Dataset(store, max_len=4, indices=[2, 0]).lengths() == [4, 4]  # shifted, truncated
    assert store.fetches_ahead is False and store.layer_ids == [] and dict(store.config) == {}
    store.prefetch([2, 1, 0])
    store.close()
    assert store.loads == 6
    store.check_verifier(hidden_size=H, num_hidden_layers=8)  # nothing recorded: nothing to refuse


def test_build_sample_store_checks_the_verifier_once_for_any_source(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from speculators.train import data_source
    from speculators.train.data_source import build_sample_store

    def register(name, builder):  # undone after the test
        monkeypatch.setitem(data_source._SOURCES, name, builder)

    write_store(tmp_path / "d", [4, 5])
    cfg = SimpleNamespace(data_source=None, vllm_endpoint=None, data_path=str(tmp_path / "d"), on_corrupt="skip",
                          data_format_version=1)
    verifier = SimpleNamespace(hidden_size=H, num_hidden_layers=8)
    assert build_sample_store(cfg, verifier).layer_ids == LAYERS
    with pytest.raises(UserError, match="hidden_size 8 does not match the verifier's 16"):
        build_sample_store(cfg, SimpleNamespace(hidden_size=16, num_hidden_layers=8))
    calls = []

    class Recorded(_CountingStore):
        def check_verifier(self, **kw):
            calls.append(kw)

    register("test-recorded", lambda c: Recorded([4]))
    build_sample_store(SimpleNamespace(**{**vars(cfg), "data_source": "test-recorded"}), verifier)
    assert calls == [{"hidden_size": H, "num_hidden_layers": 8}]
    register("test-not-a-store", lambda c: [1, 2])
    with pytest.raises(TypeError, match="not a SampleStore"):
        build_sample_store(SimpleNamespace(**{**vars(cfg), "data_source": "test-not-a-store"}))


def test_sample_with_wrong_shape_is_corrupt(tmp_path):
    write_store(tmp_path / "d", [4, 5])
    bad = make_sample(5, seed=9)
    bad["hidden_states"] = bad["hidden_states"][:2]
    write_pt_sample(tmp_path / "d", 1, bad)
    store = PtSampleStore(tmp_path / "d", on_corrupt="raise")
    with pytest.raises(CorruptSampleError, match="data_1.pt"):
        store.load(1)


def test_corrupt_file_skipped_with_warning_or_raises(tmp_path):
    write_store(tmp_path / "d", [4, 5, 6])
    (tmp_path / "d" / "data_1.pt").write_bytes(b"not a torch file")
    store = PtSampleStore(tmp_path / "d", on_corrupt="skip")
    with pytest.warns(UserWarning, match="data_1.pt"):
        got = store.load(1)
    assert got["input_ids"].shape[0] == 6  # next good sample served instead
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.load(1)["input_ids"].shape[0] == 6  # warned once only
    with pytest.raises(CorruptSampleError, match="data_1.pt"):
        PtSampleStore(tmp_path / "d", on_corrupt="raise").load(1)


def test_convert_to_safetensors_roundtrip(tmp_path):
    samples = write_store(tmp_path / "pt", [6, 4, 9, 3, 7])
    (tmp_path / "pt" / "data_3.pt").write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="data_3.pt"):
        config = convert_pt_to_safetensors(tmp_path / "pt", tmp_path / "st", shard_tokens=10)
    assert config["format"] == "safetensors" and config["skipped_corrupt"] == [3]
    assert len(config["shards"]) >= 2
    st = open_sample_store(tmp_path / "st")
    assert isinstance(st, SafetensorsSampleStore)
    assert st.sample_indices == [0, 1, 2, 4] and st.lengths() == [6, 4, 9, 7]
    for i, idx in enumerate(st.sample_indices):
        got, want = st.load(i), samples[idx]
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["loss_mask"], want["loss_mask"])
        for a, b in zip(got["hidden_states"], want["hidden_states"]):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    # The Dataset gives identical items from either layout.
    ds_st = Eagle3Dataset(st)
    ds_pt = Eagle3Dataset(PtSampleStore(tmp_path / "pt"), indices=[0, 1, 2, 3])  # store idx 3 == data_4
    for i in range(4):
        a, b = ds_st[i], ds_pt[i]
        for key in ("hidden_states", "verifier_last_hidden_states", "input_ids", "loss_mask"):
            assert torch.equal(a[key], b[key])
    meta = _data_config.load(tmp_path / "st" / "data_config.json")
    assert meta["layer_ids"] == LAYERS


def test_convert_refuses_same_dir(tmp_path):
    write_store(tmp_path / "pt", [4])
    with pytest.raises(UserError, match="differ"):
        convert_pt_to_safetensors(tmp_path / "pt", tmp_path / "pt")


def test_public_conversions_skip_or_raise_on_corrupt_samples(tmp_path):
    """Both public-layout converters share the pt converter's pass: warn + record a corrupt sample
    (or raise), and refuse a source with no readable sample."""
    from safetensors.torch import load_file

    from speculators.data.public_convert import convert_from_public, convert_to_public

    samples = write_store(tmp_path / "pt", [6, 4, 9, 5])
    (tmp_path / "pt" / "data_1.pt").write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="data_1.pt"):
        public = convert_to_public(tmp_path / "pt", tmp_path / "public")
    assert public["skipped_corrupt"] == [1] and public["source_sample_index"] == [0, 2, 3]
    with pytest.raises(CorruptSampleError, match="data_1.pt"):
        convert_to_public(tmp_path / "pt", tmp_path / "public_raise", on_corrupt="raise")

    # Row 1 of the public copy (source sample 2) is broken in turn.
    (tmp_path / "public" / "hidden_states" / "hs_1.safetensors").write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="hs_1.safetensors"):
        back = convert_from_public(tmp_path / "public", tmp_path / "back")
    assert back["skipped_corrupt"] == [1] and sorted(back["lengths"]) == ["0", "2"]
    assert torch.equal(torch.load(tmp_path / "back" / "data_2.pt")["input_ids"], samples[3]["input_ids"])
    assert load_file(str(tmp_path / "public" / "hidden_states" / "hs_0.safetensors"))["token_ids"].tolist() == \
        samples[0]["input_ids"].tolist()

    for k in (0, 2, 3):
        (tmp_path / "pt" / f"data_{k}.pt").write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="every sample was corrupt; nothing converted"):
        convert_to_public(tmp_path / "pt", tmp_path / "none")
