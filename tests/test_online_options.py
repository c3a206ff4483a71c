"""`OnlineOptions`: the online-training options are read once, the same from parsed flags as from
a TrainConfig, and an absent flag takes the TrainConfig default (not a second, hand-kept one)."""

from __future__ import annotations

import argparse

import pytest

from speculators.config.train import ONLINE_FIELDS, TrainConfig
from speculators.online.cli_args import OnlineOptions, add_online_args, online_enabled

ARGV = ["--vllm-endpoint", "http://a:1,http://b:2", "--vllm-endpoint", "http://c:3", "--on-missing", "skip",
        "--on-generate", "cache", "--hidden-states-path", "/tmp/hs", "--prepared-data", "/tmp/prep",
        "--prefetch", "3", "--vllm-workers", "2", "--vllm-model", "m", "--vllm-timeout", "7.5",
        "--vllm-max-wait", "9", "--vllm-layer-ids", "1", "3", "6", "8", "--hidden-states-dtype", "fp8"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_online_args(parser)
    return parser


def test_flags_and_a_train_config_give_the_same_options():
    args = _parser().parse_args(ARGV)
    args.verifier_name_or_path = "v"
    cfg = TrainConfig(verifier_name_or_path="v", vllm_endpoint=["http://a:1,http://b:2", "http://c:3"],
                      on_missing="skip", on_generate="cache", hidden_states_path="/tmp/hs", prepared_data="/tmp/prep",
                      prefetch=3, vllm_workers=2, vllm_model="m", vllm_timeout=7.5, vllm_max_wait=9,
                      vllm_layer_ids=[1, 3, 6, 8], hidden_states_dtype="fp8")
    opts = OnlineOptions.from_args(args)
    assert opts == OnlineOptions.from_args(cfg)
    assert opts.endpoints == ("http://a:1", "http://b:2", "http://c:3")
    assert opts.vllm_layer_ids == (1, 3, 6, 8) and opts.vllm_timeout == 7.5 and opts.verifier == "v"
    assert online_enabled(args) and online_enabled(cfg)


def test_absent_flags_take_the_train_config_defaults():
    # a Namespace with one flag, as another command might build it: every other option is
    # TrainConfig's default, field by field
    opts = OnlineOptions.from_args(argparse.Namespace(vllm_endpoint="http://a:1", data_path="/tmp/prep"))
    defaults = TrainConfig(verifier_name_or_path="v")
    for name in ONLINE_FIELDS:
        if name in ("vllm_endpoint", "prepared_data"):
            continue
        want = getattr(defaults, name)
        assert getattr(opts, name) == (tuple(want) if isinstance(want, list) else want), name
    assert opts.prepared_data == "/tmp/prep"  # --data-path stands in for --prepared-data
    assert opts.verifier is None and opts.vllm_api_key is None
    # and what argparse gives with no flags at all agrees with them
    assert OnlineOptions.from_args(_parser().parse_args([])) == \
        OnlineOptions.from_args(argparse.Namespace(vllm_endpoint=None))
    assert not online_enabled(argparse.Namespace())


def test_other_sources_are_refused_by_type():
    with pytest.raises(TypeError, match="Namespace or a TrainConfig"):
        OnlineOptions.from_args({"vllm_endpoint": "http://a:1"})
