"""The online/hybrid sample store against the local vLLM-protocol test server."""

import argparse
import pickle
import threading

import pytest
import torch

from speculators.data.formats import open_sample_store, write_pt_sample
from speculators.errors import UserError
from speculators.online.cli_args import add_online_args, build_online_store
from speculators.online.store import OnlineConfig, OnlineSampleStore, PreparedRows
from speculators.vllm.retry import ServerUnavailableError

from tests.support.hs_server import HiddenStatesTestServer, make_prepared_dataset, transformers_compute

LAYERS = [2, 4, 5, 8]
N = 6


@pytest.fixture(scope="module")
def prepared(tiny_llama, tmp_path_factory):
    return make_prepared_dataset(tmp_path_factory.mktemp("prep") / "prepared", tiny_llama, num_samples=N)


@pytest.fixture()
def server(tiny_llama, tmp_path):
    with HiddenStatesTestServer(tiny_llama, tmp_path / "vllm_out", LAYERS) as s:
        yield s


def _store(prepared, server_url, **kw):
    cfg = OnlineConfig(endpoint=server_url, layer_ids=LAYERS, max_wait_s=5.0, **kw)
    return OnlineSampleStore(PreparedRows.from_path(prepared), cfg)


def test_generate_delete_returns_verifier_states_and_keeps_nothing(prepared, server, tiny_llama, tmp_path):
    store = _store(prepared, server.url)
    compute = transformers_compute(tiny_llama, LAYERS)
    rows = PreparedRows.from_path(prepared)
    assert len(store) == N and store.lengths() == rows.lengths()
    for i in (0, 3):
        s = store.load(i)
        ids, mask = rows.get(i)
        assert s["input_ids"].tolist() == ids and s["loss_mask"].tolist() == mask
        expected = compute(ids)
        assert len(s["hidden_states"]) == 4
        for k, h in enumerate(s["hidden_states"]):
            assert h.dtype == torch.bfloat16 and torch.equal(h, expected[:, k])
    assert list((tmp_path / "vllm_out").iterdir()) == []
    assert store.stats["on_demand"] == 2


def test_cache_mode_writes_a_datagen_directory_and_stops_asking(prepared, server, tmp_path):
    cache = tmp_path / "cache"
    store = _store(prepared, server.url, hidden_states_path=str(cache), on_generate="cache")
    first = [store.load(i) for i in range(N)]
    served = server.completions_served
    assert served == N and store.stats["cached"] == N
    second = [store.load(i) for i in range(N)]  # epoch 2: all from disk
    assert server.completions_served == served and store.stats["disk"] == N
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert all(torch.equal(x, y) for x, y in zip(a["hidden_states"], b["hidden_states"]))
    disk = open_sample_store(cache)  # the cache is a valid offline dataset
    assert len(disk) == N and disk.config["layer_ids"] == LAYERS
    assert all(torch.equal(x, y) for x, y in zip(disk.load(2)["hidden_states"], first[2]["hidden_states"]))
    # A later run in hybrid mode reads the cache even with the server gone.
    server.stop()
    again = _store(prepared, server.url, hidden_states_path=str(cache), on_missing="raise")
    assert torch.equal(again.load(5)["loss_mask"], first[5]["loss_mask"])


def test_a_cached_file_that_breaks_the_schema_is_requested_again_or_refused(prepared, server, tmp_path):
    """Cache files are read by the pt layout's one reader, with data_config.json's schema."""
    cache = tmp_path / "cache"
    good = _store(prepared, server.url, hidden_states_path=str(cache), on_generate="cache").load(2)
    write_pt_sample(cache, 2, dict(good, hidden_states=good["hidden_states"][:2]))  # 2 layers, not 4
    served = server.completions_served
    again = _store(prepared, server.url, hidden_states_path=str(cache))
    got = again.load(2)
    assert server.completions_served == served + 1 and again.stats["on_demand"] == 1
    assert all(torch.equal(a, b) for a, b in zip(got["hidden_states"], good["hidden_states"], strict=True))
    strict = _store(prepared, None, hidden_states_path=str(cache), on_missing="skip")
    with pytest.raises(UserError, match="data_2.pt: has 2 hidden-state layers.*--on-missing generate"):
        strict.load(0)


def test_a_cache_made_for_another_verifier_is_refused_where_the_store_is_opened(prepared, server, tmp_path):
    cache = tmp_path / "cache"
    _store(prepared, server.url, hidden_states_path=str(cache), on_generate="cache").load(0)  # hidden size 64
    other = _store(prepared, server.url, hidden_states_path=str(cache), hidden_size=32, num_hidden_layers=8)
    with pytest.raises(UserError, match=f"{cache}/data_config.json: hidden_size 64 does not match the verifier's 32"):
        other.check_verifier(hidden_size=32, num_hidden_layers=8)
    _store(prepared, server.url, hidden_states_path=str(cache), hidden_size=64).check_verifier(hidden_size=64)


def test_skip_and_raise_use_only_what_is_on_disk(prepared, server, tmp_path):
    cache = tmp_path / "cache"
    warm = _store(prepared, server.url, hidden_states_path=str(cache), on_generate="cache")
    warm.load(1)
    warm.load(4)
    skip = _store(prepared, None, hidden_states_path=str(cache), on_missing="skip")
    assert len(skip) == 2 and skip.load(1)["input_ids"].tolist() == PreparedRows.from_path(prepared).get(4)[0]
    with pytest.raises(UserError, match="4 of 6 samples"):
        _store(prepared, None, hidden_states_path=str(cache), on_missing="raise")
    with pytest.raises(UserError, match="--vllm-endpoint"):
        _store(prepared, None)
    with pytest.raises(UserError, match="layers"):
        OnlineSampleStore(PreparedRows.from_path(prepared),
                          OnlineConfig(endpoint=server.url, hidden_states_path=str(cache), layer_ids=[1, 8]))


class GatedClient:
    """Stands in for the HTTP client: each request records its row, then waits until the test
    releases that row, so what runs ahead and at once is seen by counting, not by timing."""

    def __init__(self, rows: PreparedRows):
        self.row_of = {tuple(rows.get(i)[0]): i for i in range(len(rows))}
        self.started: list[int] = []
        self.released: set[int] = set()
        self.cond = threading.Condition()

    def fetch(self, token_ids):
        row = self.row_of[tuple(token_ids)]
        with self.cond:
            self.started.append(row)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: row in self.released, timeout=60), f"row {row} never released"
        return torch.full((len(token_ids), len(LAYERS), 8), float(row))

    def wait_started(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.started) >= n, timeout=60), self.started

    def release(self, rows) -> None:
        with self.cond:
            self.released.update(rows)
            self.cond.notify_all()


def test_prefetch_requests_the_planned_rows_ahead_and_at_once(prepared):
    rows = PreparedRows.from_path(prepared)
    client = GatedClient(rows)
    config = OnlineConfig(endpoint="http://unused", layer_ids=LAYERS, prefetch_depth=3, workers=3)
    store = OnlineSampleStore(rows, config, client=client)
    order = [4, 1, 5, 0, 3, 2]
    store.prefetch(order)
    # Before any load, three requests are in flight together (none answered yet): the first three
    # planned rows, and no more than --prefetch.
    client.wait_started(3)
    assert sorted(client.started) == sorted(order[:3])
    client.release(order)
    for i in order:
        assert store.load(i)["hidden_states"][0][0, 0].item() == i
    assert sorted(client.started) == sorted(order)  # each row asked for once
    assert store.stats["prefetched"] == len(order) and store.stats["on_demand"] == 0
    store.close()


def test_prefetch_survives_failures_and_reports_a_dead_server(prepared, server, tmp_path):
    store = _store(prepared, server.url, prefetch_depth=3)
    store.load(0)
    server.fail_next(3, 503)
    store.prefetch([1, 2, 3])
    assert [store.load(i)["input_ids"].shape[0] > 0 for i in (1, 2, 3)] == [True] * 3
    server.stop()
    store.prefetch([4, 5])
    with pytest.raises(ServerUnavailableError, match="bounded wait"):
        store.load(4)
    store.close()


def test_store_pickles_for_dataloader_workers(prepared, server):
    store = _store(prepared, server.url, prefetch_depth=2)
    store.prefetch([0, 1])
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone.load(1)["input_ids"], store.load(1)["input_ids"])
    store.close()
    clone.close()


def test_train_flags_build_the_store(prepared, server, tiny_llama, tmp_path):
    p = argparse.ArgumentParser()
    add_online_args(p)
    args = p.parse_args(["--vllm-endpoint", server.url, "--on-generate", "cache", "--hidden-states-path",
                         str(tmp_path / "c"), "--prepared-data", str(prepared), "--prefetch", "2"])
    args.verifier = str(tiny_llama)
    store = build_online_store(args)
    assert store.config == {"version": 1, "format": "online", "layer_ids": LAYERS, "hidden_size": 64,
                            "num_hidden_layers": 8}
    assert len(store.load(0)["hidden_states"]) == 4
    bad = p.parse_args(["--vllm-endpoint", server.url])
    with pytest.raises(UserError, match="--prepared-data"):
        build_online_store(bad)
    with pytest.raises(SystemExit):
        p.parse_args(["--on-missing", "maybe"])


def test_a_new_plan_drops_requests_nobody_will_read(prepared, server):
    store = _store(prepared, server.url, prefetch_depth=2)
    store.prefetch([0, 1, 2])
    store.prefetch([3, 4])  # e.g. DataLoader workers consumed the old plan elsewhere
    assert set(store._futures) <= {3, 4}
    assert store.load(3)["input_ids"].shape[0] > 0 and store.stats["prefetched"] == 1
    store.close()


def test_an_fp8_cache_serves_the_same_values_every_epoch_and_keeps_its_dtype(prepared, server, tiny_llama, tmp_path):
    from speculators.data.dataset import Eagle3Collator, shift_sample
    from speculators.data.hs_quant import dequantise_rows, quantise_rows
    from speculators.train.step_data import to_device

    cache = tmp_path / "cache"
    p = argparse.ArgumentParser()
    add_online_args(p)
    args = p.parse_args(["--vllm-endpoint", server.url, "--on-generate", "cache", "--hidden-states-path",
                         str(cache), "--prepared-data", str(prepared), "--hidden-states-dtype", "fp8",
                         "--vllm-layer-ids", *map(str, LAYERS)])
    args.verifier = str(tiny_llama)
    store = build_online_store(args)
    compute = transformers_compute(tiny_llama, LAYERS)
    rows = PreparedRows.from_path(prepared)
    first = [store.load(i) for i in range(N)]  # from the server, cached as fp8
    second = [store.load(i) for i in range(N)]  # from disk
    # what the training loader reads: as stored (fp8 + scales), from disk and freshly generated
    stored = [store.load_stored(i) for i in range(N)]
    assert store.stats["cached"] == N and store.stats["disk"] == 2 * N
    fresh = build_online_store(argparse.Namespace(**{**vars(args), "hidden_states_path": str(tmp_path / "c2")}))
    generated = [fresh.load_stored(i) for i in range(N)]
    assert fresh.stats["cached"] == N and fresh.stats["disk"] == 0
    collate, cpu = Eagle3Collator(64), torch.device("cpu")
    for i, (a, b) in enumerate(zip(first, second)):
        expected = compute(rows.get(i)[0])
        for k, (x, y) in enumerate(zip(a["hidden_states"], b["hidden_states"])):
            q, s = quantise_rows(expected[:, k])  # the server's bf16 states, quantised directly
            assert x.dtype == y.dtype == torch.bfloat16
            assert torch.equal(x, y) and torch.equal(x, dequantise_rows(q, s))
            for raw in (stored[i], generated[i]):
                assert torch.equal(raw["hidden_states"][k].view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(raw["hidden_states_scale"][k], s)
        # the step's batch, dequantised by to_device, equals the batch of the host-dequantised sample
        want = collate([shift_sample(b)])
        for raw in (stored[i], generated[i]):
            got = to_device(collate([shift_sample(raw)]), cpu, torch.bfloat16)
            assert set(got) == set(want) and all(torch.equal(got[key], want[key]) for key in want)
    fresh.close()
    raw = torch.load(cache / "data_0.pt", weights_only=True)
    assert raw["hidden_states"][0].dtype == torch.float8_e4m3fn
    disk = open_sample_store(cache)
    assert disk.config["hidden_states_dtype"] == "float8_e4m3fn" and disk.storage == "fp8"
    # a later run without the flag keeps the cache's dtype; asking for the other one is refused
    args.hidden_states_dtype = None
    assert build_online_store(args).online.store_dtype == "fp8"
    args.hidden_states_dtype = "bf16"
    with pytest.raises(UserError, match="stored as fp8, --hidden-states-dtype is bf16"):
        build_online_store(args)
