"""`--compile` (speculators.train.compile_step): the compiled draft step trains like the eager one.

The reference is the same run without `--compile`: three optimizer steps of a tiny Llama-shaped
draft must give the same losses to float32 rounding, and the compiled run must really have run
compiled graphs (Dynamo's graph count: one layer graph per TTT step and the loss chunk). The
settings `--compile` was not measured with are refused before anything is built.
"""

from __future__ import annotations

import math

import pytest
import torch

from speculators.config.train import TrainConfig
from speculators.errors import UserError
from speculators.train.components import build_components
from speculators.train.distributed import DistInfo
from speculators.train.trainer import run_training

from tests.support.train_helpers import make_cfg, train_losses


def _losses(tiny_llama, hs_data, save, **kw) -> dict[int, float]:
    run_training(make_cfg(tiny_llama, hs_data, save, epochs=1, max_steps=3, seed=3, **kw))
    return train_losses(save)


def test_compiled_step_trains_like_eager(tiny_llama, hs_data, tmp_path):
    from torch._dynamo.utils import counters

    eager = _losses(tiny_llama, hs_data, tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = _losses(tiny_llama, hs_data, tmp_path / "compiled", compile=True)
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert math.isfinite(eager[step])
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5, abs=1e-6), (step, eager, compiled)
    # make_cfg's 2 TTT steps: the layer's graph at each step, and the fused loss's chunk.
    assert counters["stats"]["unique_graphs"] >= 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_the_flag_reaches_the_config():
    from speculators.train.cli import add_train_arguments, config_from_args
    import argparse

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    base = ["--verifier-name-or-path", "v", "--data-path", "d"]
    assert config_from_args(p.parse_args([*base, "--compile"])).compile is True
    assert config_from_args(p.parse_args(base)).compile is False


@pytest.mark.parametrize("extra, info, message", [
    ({}, DistInfo(rank=0, world_size=2), "one process only"),
    ({}, DistInfo(device=torch.device("cuda")), "--attn-impl sdpa"),
    ({"attn_impl": "flex"}, DistInfo(device=torch.device("cuda")), "flex attention"),
    ({"gradient_checkpointing": True}, DistInfo(), "--gradient-checkpointing"),
    ({"algorithm": "dflash"}, DistInfo(), "--algorithm eagle3 only"),
])
def test_untested_settings_are_refused_before_anything_is_built(extra, info, message, tmp_path):
    cfg = TrainConfig(verifier_name_or_path=str(tmp_path / "none"), save_path=str(tmp_path / "s"), compile=True,
                      **extra)
    with pytest.raises(UserError, match="--compile") as err:
        build_components(cfg, info)  # the verifier does not exist: a refusal must come first
    assert message in str(err.value)
    assert not (tmp_path / "s").exists()
