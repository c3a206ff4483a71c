"""`--precision` and `--optimizer-impl`: the speed options the benchmarks measured."""

import math

import pytest
import torch
from test_checkpoint import hs_data, make_cfg, train_losses  # noqa: F401 (fixture)

from speculators.errors import UserError
from speculators.train.trainer import adamw_kernel, autocast_enabled, run_training


def test_precision_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_enabled("auto", cuda) and not autocast_enabled("auto", cpu)
    assert autocast_enabled("bf16", cpu) and not autocast_enabled("fp32", cuda)
    with pytest.raises(UserError, match="--precision"):
        autocast_enabled("fp16", cpu)


def test_optimizer_kernel_rule():
    assert adamw_kernel("auto", 1) == {"fused": True}
    assert adamw_kernel("auto", 2) == {"foreach": True}
    assert adamw_kernel("foreach", 1) == {"foreach": True}
    with pytest.raises(UserError, match="--optimizer-impl"):
        adamw_kernel("apex", 1)


def test_fused_and_foreach_adamw_train_the_same(tiny_llama, hs_data, tmp_path):  # noqa: F811
    fused = train_losses_of(tiny_llama, hs_data, tmp_path / "fused", optimizer_impl="fused")
    foreach = train_losses_of(tiny_llama, hs_data, tmp_path / "foreach", optimizer_impl="foreach")
    assert fused.keys() == foreach.keys()
    for step in fused:
        assert math.isclose(fused[step], foreach[step], rel_tol=1e-4), step


def test_cpu_bf16_autocast_trains_close_to_fp32(tiny_llama, hs_data, tmp_path):  # noqa: F811
    fp32 = train_losses_of(tiny_llama, hs_data, tmp_path / "fp32", precision="fp32")
    bf16 = train_losses_of(tiny_llama, hs_data, tmp_path / "bf16", precision="bf16")
    assert fp32.keys() == bf16.keys()
    first = min(fp32)
    assert math.isclose(bf16[first], fp32[first], rel_tol=0.05)
    last = max(fp32)
    assert bf16[last] < bf16[first]  # it learns


def train_losses_of(verifier, data, save, **kw):
    run_training(make_cfg(verifier, data, save, epochs=2, **kw))
    return train_losses(save)
