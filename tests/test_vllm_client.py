"""The hidden-state HTTP protocol: request building, response parsing, files, retries."""

import fcntl
import functools
import os

import pytest
import torch

from speculators.vllm import client as client_mod
from speculators.vllm import hs_files
from speculators.vllm.client import (
    ClientConfig,
    HiddenStatesClient,
    build_completion_request,
    normalize_endpoint,
    parse_completion_response,
)
from speculators.vllm.hs_files import lock_path, read_hidden_states_file, write_hidden_states_file
from speculators.vllm.retry import (
    InvalidResponseError,
    RetryPolicy,
    ServerUnavailableError,
    TransientServerError,
    call_with_retries,
)

from tests.support.hs_server import HiddenStatesTestServer, free_port, transformers_compute

LAYERS = [2, 4, 5, 8]
TOKENS = [5, 17, 42, 99, 100, 7, 3, 250]


def test_request_and_response_shapes():
    body = build_completion_request("m", TOKENS)
    assert body["prompt"] == TOKENS and body["max_tokens"] == 1 and body["return_token_ids"] is True
    ok = {"choices": [{"prompt_token_ids": TOKENS}], "kv_transfer_params": {"hidden_states_path": "/x/1.safetensors"}}
    assert parse_completion_response(ok, TOKENS) == "/x/1.safetensors"
    with pytest.raises(InvalidResponseError, match="prompt_token_ids"):
        parse_completion_response({"choices": [{}], "kv_transfer_params": ok["kv_transfer_params"]}, TOKENS)
    with pytest.raises(InvalidResponseError, match="tokenized"):
        parse_completion_response({**ok, "choices": [{"prompt_token_ids": TOKENS[:-1]}]}, TOKENS)
    with pytest.raises(InvalidResponseError, match="launch-vllm"):
        parse_completion_response({"choices": ok["choices"]}, TOKENS)
    assert normalize_endpoint("localhost:8000/v1/") == "http://localhost:8000"


def test_retry_policy_backs_off_and_gives_up_after_bounded_wait():
    now = [0.0]
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    calls = []

    def always_down():
        calls.append(now[0])
        raise TransientServerError("connection refused")

    policy = RetryPolicy(max_wait_s=10, initial_backoff_s=1, max_backoff_s=4, multiplier=2)
    with pytest.raises(ServerUnavailableError, match="bounded wait 10s.*connection refused.*check"):
        call_with_retries(always_down, policy, "GET x", "check it", sleep=sleep, clock=lambda: now[0])
    assert sleeps == [1, 2, 4] and now[0] <= 10
    # A transient failure then success returns the value; other errors pass straight through.
    seq = iter([TransientServerError("503"), 7])

    def flaky():
        v = next(seq)
        if isinstance(v, Exception):
            raise v
        return v

    assert call_with_retries(flaky, policy, "x", sleep=sleep, clock=lambda: now[0]) == 7
    with pytest.raises(InvalidResponseError):
        call_with_retries(lambda: (_ for _ in ()).throw(InvalidResponseError("bad")), policy, "x", sleep=sleep)


def test_reader_waits_for_the_writer_lock(tmp_path, monkeypatch):
    """The writer holds the lock; the reader's first wait releases it (the writer finishing)."""
    path = tmp_path / "r.safetensors"
    write_hidden_states_file(path, torch.tensor(TOKENS), torch.zeros(len(TOKENS), 2, 4))
    fd = os.open(lock_path(path), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    waits = []

    def writer_finishes(seconds):
        if not waits:
            os.close(fd)
        waits.append(seconds)

    monkeypatch.setattr(hs_files.time, "sleep", writer_finishes)
    data = read_hidden_states_file(path, lock_timeout_s=5)
    assert len(waits) == 1  # it waited while the lock was held, and read once it was free
    assert data["token_ids"].tolist() == TOKENS and data["hidden_states"].shape == (len(TOKENS), 2, 4)


@pytest.fixture()
def server(tiny_llama, tmp_path):
    with HiddenStatesTestServer(tiny_llama, tmp_path / "vllm_hs", LAYERS, model_name="verifier") as s:
        yield s


def _client(url, **kw):
    kw.setdefault("retry", RetryPolicy(max_wait_s=10, initial_backoff_s=0.05))
    return HiddenStatesClient(ClientConfig(endpoint=url + "/v1", num_layers=len(LAYERS), **kw))


def test_fetch_returns_the_verifier_layers_and_cleans_up(server, tiny_llama, tmp_path):
    client = _client(server.url)
    hs = client.fetch(TOKENS)
    expected = transformers_compute(tiny_llama, LAYERS)(TOKENS)
    assert hs.shape == (len(TOKENS), len(LAYERS), 64) and hs.dtype == torch.bfloat16
    assert torch.equal(hs, expected)
    assert client.model() == "verifier"
    assert not [p for p in (tmp_path / "vllm_hs").iterdir()]  # file and lock removed
    client.fetch(TOKENS, keep_file=True)
    assert len(list((tmp_path / "vllm_hs").glob("*.safetensors"))) == 1


def test_transient_errors_are_retried(server):
    client = _client(server.url)
    client.model()
    server.fail_next(2, 503)
    seen = server.requests_seen
    assert client.fetch(TOKENS).shape[0] == len(TOKENS)
    assert server.requests_seen - seen == 3


def test_client_errors_fail_at_once(server):
    client = _client(server.url, model="other-model")
    with pytest.raises(InvalidResponseError, match="other-model"):
        client.fetch(TOKENS)
    layers_mismatch = HiddenStatesClient(ClientConfig(endpoint=server.url, num_layers=3))
    with pytest.raises(InvalidResponseError, match="target-layer-ids"):
        layers_mismatch.fetch(TOKENS)


def _fake_retry_clock(monkeypatch, on_sleep=lambda: None) -> list[float]:
    """The client's retries on a fake clock: each backoff is recorded, advances the clock, then
    runs ``on_sleep``; returns the recorded backoffs."""
    now, sleeps = [0.0], []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds
        on_sleep()

    monkeypatch.setattr(client_mod, "call_with_retries",
                        functools.partial(call_with_retries, sleep=sleep, clock=lambda: now[0]))
    return sleeps


def test_survives_a_server_restart(tiny_llama, tmp_path, monkeypatch):
    port = free_port()
    first = HiddenStatesTestServer(tiny_llama, tmp_path / "hs", LAYERS, port=port).start()
    client = _client(first.url)
    client.fetch(TOKENS)
    first.stop()
    second = HiddenStatesTestServer(tiny_llama, tmp_path / "hs", LAYERS, port=port)

    def restart_on_the_first_backoff():
        if len(sleeps) == 1:
            second.start()

    sleeps = _fake_retry_clock(monkeypatch, on_sleep=restart_on_the_first_backoff)
    try:
        assert client.fetch(TOKENS).shape[1] == len(LAYERS)
        assert sleeps == [0.05]  # refused while down, one backoff (the restart), then served
    finally:
        second.stop()


def test_down_server_gives_a_clear_error_after_the_bounded_wait(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    client = _client(url, retry=RetryPolicy(max_wait_s=1.0, initial_backoff_s=0.1))
    sleeps = _fake_retry_clock(monkeypatch)
    with pytest.raises(ServerUnavailableError) as info:
        client.fetch(TOKENS)
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])  # the next backoff (0.8) would pass the 1 s bound
    msg = str(info.value)
    assert "failed 4 time(s) over 0.7s (bounded wait 1s)" in msg
    assert url in msg and "--vllm-endpoint" in msg and "launch-vllm" in msg
