"""Online training from several hidden-state servers (`--vllm-endpoint` repeated).

1. The pool's policy (`speculators.online.endpoints.choose`) against a brute-force reference
   over every small state; the pool's back-off and the all-dead bounded wait.
2. Two REAL vLLM CPU servers (`launch-vllm`, a tiny verifier with head_dim 32, the smallest
   vLLM's CPU attention runs): the session's shared one (fixture `shared_launch_vllm`, also
   used by tests/test_real_vllm.py) and one of this test's own, booted alongside it: one hybrid
   training run reads from both (their own /metrics request counters, read as differences,
   say both answered); this test's server is SIGKILLed mid-run, its in-flight and later
   requests go to the shared one, and the run completes with every sample cached exactly once,
   each equal to what the surviving server computes for that row.
3. A stand-in server (tests/support/hs_server.py) only for the refusal of an endpoint that
   serves other layers: showing that with the real engine would need a third vLLM start (about
   a minute of CI on two cores) for a check that is pure protocol (the launch-vllm record).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from speculators.online.endpoints import EndpointPool, EndpointState, MultiEndpointClient, choose
from speculators.vllm.client import ClientConfig
from speculators.vllm.retry import RetryPolicy, ServerUnavailableError


# ---------------------------------------------------------------- policy (pure logic)
def _reference_choice(states, now):
    """Brute force: every live endpoint, ranked by (in flight, served, position)."""
    live = [(s.in_flight, s.served, i) for i, s in enumerate(states) if s.dead_until <= now]
    return sorted(live)[0][2] if live else None


def test_choose_equals_brute_force_over_every_small_state():
    values = [0, 1, 2]
    checked = 0
    for n in (1, 2, 3):
        per_endpoint = list(itertools.product(values, values, (0.0, 5.0)))  # in_flight, served, dead_until
        for combo in itertools.product(per_endpoint, repeat=n):
            states = [EndpointState(in_flight=a, served=b, dead_until=d) for a, b, d in combo]
            for now in (0.0, 5.0):
                assert choose(states, now) == _reference_choice(states, now), (states, now)
                checked += 1
    assert checked > 6000


def test_pool_spreads_by_load_and_backs_off_a_failing_endpoint():
    now = [0.0]
    pool = EndpointPool(2, RetryPolicy(initial_backoff_s=1.0, multiplier=2.0, max_backoff_s=3.0), clock=lambda: now[0])
    assert [pool.acquire(), pool.acquire(), pool.acquire()] == [0, 1, 0]  # in-flight counts 2, 1
    assert pool.release(1, ok=False) == 1.0  # dead for 1 s
    assert pool.acquire() == 0  # 1 is dead although it has less in flight
    now[0] = 1.0
    assert pool.acquire() == 1  # back after its back-off
    assert pool.release(1, ok=False) == 2.0  # second consecutive failure: longer back-off
    pool.release(0, ok=False), pool.release(0, ok=False), pool.release(0, ok=False)
    assert pool.acquire() is None and pool.seconds_until_live() == pytest.approx(2.0)
    now[0] = 3.0
    assert pool.acquire() == 1


def test_all_endpoints_dead_fails_within_the_bounded_wait_naming_every_one():
    from tests.support.hs_server import free_port

    ports = [free_port(), free_port()]  # nothing listens there
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    now = [0.0]  # the waiting is on a fake clock (the refusals are real): no timing in the test

    def sleep(seconds: float) -> None:
        now[0] += seconds

    client = MultiEndpointClient(ClientConfig(endpoint=urls[0], model="m", retry=RetryPolicy(
        max_wait_s=5.0, initial_backoff_s=0.5, max_backoff_s=1.0)), urls, sleep=sleep, clock=lambda: now[0])
    for c in client.clients:  # the served model is known (as after the start check)
        c._model_checked = True
    with pytest.raises(ServerUnavailableError) as err:
        client.fetch([1, 2, 3])
    assert 4.0 <= now[0] <= 5.0  # waited for the dead endpoints, within --vllm-max-wait
    assert sum(s.failures for s in client.pool.states) >= 6  # both retried after each back-off
    assert all(u in str(err.value) for u in urls) and "5s" in str(err.value)
    assert "Connection refused" in str(err.value) or "refused" in str(err.value).lower()


def test_repeated_flag_comma_list_and_config_list_mean_the_same_endpoints(tmp_path):
    import argparse

    from speculators.config.base import to_argv
    from speculators.config.train import TrainConfig
    from speculators.online.cli_args import add_online_args

    parser = argparse.ArgumentParser()
    add_online_args(parser)
    a, b = "http://127.0.0.1:8001", "http://127.0.0.1:8002"
    forms = [parser.parse_args(["--vllm-endpoint", a, "--vllm-endpoint", b]).vllm_endpoint,
             parser.parse_args([f"--vllm-endpoint={a},{b}"]).vllm_endpoint, [a, b], f"{a}, {b}"]
    for form in forms:
        cfg = TrainConfig(verifier_name_or_path="v", vllm_endpoint=form)
        assert cfg.vllm_endpoints == [a, b] and cfg.online
        again = parser.parse_args([x for x in to_argv(cfg) if x.startswith("--vllm")]).vllm_endpoint
        assert TrainConfig(verifier_name_or_path="v", vllm_endpoint=again).vllm_endpoints == [a, b]
    single = TrainConfig(verifier_name_or_path="v", vllm_endpoint=parser.parse_args(["--vllm-endpoint", a]).vllm_endpoint)
    assert single.vllm_endpoint == a  # one URL: the same string as before


# ---------------------------------------------------------------- refusal (stand-in: see the docstring)
def test_an_endpoint_exporting_other_layers_is_refused_by_name(tiny_llama, tmp_path):
    from speculators.config.train import TrainConfig
    from speculators.online.cli_args import build_online_store
    from tests.support.hs_server import HiddenStatesTestServer, make_prepared_dataset
    from speculators.vllm.hs_files import write_server_info

    prepared = make_prepared_dataset(tmp_path / "prepared", tiny_llama, num_samples=2)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    write_server_info(a_dir, str(tiny_llama), [1, 2, 3])  # what launch-vllm records
    write_server_info(b_dir, str(tiny_llama), [1, 2, 4])
    with HiddenStatesTestServer(tiny_llama, a_dir, layer_ids=[1, 2, 3]) as a, \
            HiddenStatesTestServer(tiny_llama, b_dir, layer_ids=[1, 2, 4]) as b:
        cfg = TrainConfig(verifier_name_or_path=str(tiny_llama), prepared_data=str(prepared),
                          vllm_endpoint=[a.url, b.url], vllm_max_wait=5)
        with pytest.raises(Exception) as err:
            build_online_store(cfg)
    text = str(err.value)
    assert b.url in text and "[1, 2, 4]" in text and a.url in text, text


# ---------------------------------------------------------------- two real vLLM CPU servers
NUM_ROWS = 40


def len_rows_plus_checks(rows: int) -> int:
    return rows + 2  # each row requested once, plus one start-check request per server


def _metric(url: str, name: str) -> float:
    import requests

    from speculators.vllm.metrics import parse_prometheus_text

    text = requests.get(url + "/metrics", timeout=5).text
    return sum(v for n, _labels, v in parse_prometheus_text(text) if n == name)


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_training_reads_from_two_real_servers_and_survives_one_killed(shared_launch_vllm, tmp_path):
    import torch

    from speculators.cli import main
    from speculators.vllm.client import ClientConfig, HiddenStatesClient
    from speculators.vllm.readiness import free_port
    from tests.support import vllm_server

    verifier = shared_launch_vllm.verifier
    prepared = tmp_path / "prepared"
    assert main(["prepare-data", "--model", str(verifier), "--data", "sharegpt", "--output", str(prepared),
                 "--max-samples", str(NUM_ROWS), "--seq-length", "64", "--seed", "0"]) == 0

    port = free_port()
    train = None
    # b (this test's own, killed below) boots while the shared a starts, if a is not up yet
    own, t0 = vllm_server.spawn(
        vllm_server.launch_vllm_argv(verifier, vllm_server.SHARED_LAYERS, tmp_path / "hs_b", port),
        f"http://127.0.0.1:{port}", tmp_path / "launch_b.log", env=shared_launch_vllm.env())
    try:
        a = shared_launch_vllm.ensure().base_url
        b = vllm_server.wait_ready(own, t0, "launch-vllm b (killed mid-run)").base_url

        before = [_metric(u, "vllm:request_success_total") for u in (a, b)]

        cache = tmp_path / "cache"
        train = subprocess.Popen(
            [sys.executable, "-m", "speculators", "train", "--verifier-name-or-path", str(verifier),
             "--prepared-data", str(prepared), "--save-path", str(tmp_path / "run"), "--epochs", "1",
             "--total-seq-len", "64", "--device", "cpu", "--ttt-steps", "2", "--train-data-ratio", "1.0",
             "--vllm-endpoint", a, "--vllm-endpoint", b, "--vllm-workers", "2", "--prefetch", "2",
             "--on-generate", "cache", "--hidden-states-path", str(cache), "--vllm-max-wait", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(train.stdout), daemon=True)
        reader.start()
        # kill b once it has answered training requests (beyond the start check's one)
        deadline = time.monotonic() + 600
        served_b = 0.0
        while time.monotonic() < deadline and train.poll() is None:
            served_b = _metric(b, "vllm:request_success_total") - before[1]
            if served_b >= 3:
                break
            time.sleep(0.05)
        assert train.poll() is None, "training finished before server b could be killed:\n" + "".join(out)
        pgid = os.getpgid(own.process.pid)
        assert pgid != os.getpgrp()
        os.killpg(pgid, signal.SIGKILL)
        rc = train.wait(timeout=900)
        reader.join(timeout=10)
        text = "".join(out)
        assert rc == 0, text[-4000:]
        served_a = _metric(a, "vllm:request_success_total") - before[0]
        assert served_a >= 1 and served_b >= 3, (served_a, served_b)
        # b's answers as its access log recorded them up to the kill; with a's, one per row and the
        # two start checks, plus at most the requests in flight on b when it died (workers: 2)
        answered_b = (tmp_path / "launch_b.log").read_text().count('"POST /v1/completions HTTP/1.1" 200')
        assert len_rows_plus_checks(NUM_ROWS) <= served_a + answered_b <= len_rows_plus_checks(NUM_ROWS) + 2, \
            (served_a, answered_b)
        assert f"vLLM server {b} failed" in " ".join(text.split()), text[-4000:]  # its requests were moved

        # every row cached exactly once, each what the surviving server computes for it
        from datasets import load_from_disk

        rows = load_from_disk(str(prepared))
        files = sorted(cache.glob("data_*.pt"))
        assert sorted(int(p.stem.split("_")[1]) for p in files) == list(range(len(rows)))
        ref = HiddenStatesClient(ClientConfig(endpoint=a))
        for i in range(len(rows)):
            sample = torch.load(cache / f"data_{i}.pt", weights_only=True)
            ids = list(rows[i]["input_ids"])
            assert sample["input_ids"].tolist() == ids
            want = ref.fetch(ids).to(torch.float32)  # [L, K, H]
            got = torch.stack([h.to(torch.float32) for h in sample["hidden_states"]], dim=1)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want.to(torch.bfloat16).to(torch.float32), rtol=0.02, atol=0.02)
    finally:
        if train is not None and train.poll() is None:
            train.kill()
            train.wait()
        own.stop()
