"""`--precision` and `--optimizer-impl`: the speed options the benchmarks measured.

Each end-to-end test also checks the option took effect inside the trainer (the dtype the
draft's matmuls ran in, the AdamW kernel the optimizer was built with), so a flag that is
silently ignored fails here instead of training the same as the default.
"""

import math

import pytest
import torch

from speculators.errors import UserError
from speculators.train.components import adamw_kernel, autocast_enabled, build_components
from speculators.train.distributed import DistInfo
from speculators.train.trainer import Trainer

from tests.support.train_helpers import make_cfg, train_losses


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


def train(verifier, data, save, **kw) -> tuple[Trainer, dict[int, float], list[torch.dtype]]:
    """Train 2 epochs; return the trainer, its losses and the dtypes the draft's fc produced."""
    trainer = Trainer(build_components(make_cfg(verifier, data, save, epochs=2, **kw), DistInfo()))
    seen: list[torch.dtype] = []
    hook = trainer.draft.fc.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    try:
        trainer.fit()
    finally:
        hook.remove()
    return trainer, train_losses(save), seen


def test_fused_and_foreach_adamw_train_the_same(tiny_llama, hs_data, tmp_path):
    fused_tr, fused, _ = train(tiny_llama, hs_data, tmp_path / "fused", optimizer_impl="fused")
    foreach_tr, foreach, _ = train(tiny_llama, hs_data, tmp_path / "foreach", optimizer_impl="foreach")
    assert fused_tr.optimizer.defaults["fused"] and not fused_tr.optimizer.defaults["foreach"]
    assert foreach_tr.optimizer.defaults["foreach"] and not foreach_tr.optimizer.defaults["fused"]
    assert fused.keys() == foreach.keys()
    for step in fused:
        assert math.isclose(fused[step], foreach[step], rel_tol=1e-4), step


def test_cpu_bf16_autocast_trains_close_to_fp32(tiny_llama, hs_data, tmp_path):
    _, fp32, fp32_dtypes = train(tiny_llama, hs_data, tmp_path / "fp32", precision="fp32")
    _, bf16, bf16_dtypes = train(tiny_llama, hs_data, tmp_path / "bf16", precision="bf16")
    assert set(fp32_dtypes) == {torch.float32}
    assert set(bf16_dtypes) == {torch.bfloat16}  # the matmuls really ran under bf16 autocast
    assert fp32.keys() == bf16.keys()
    first = min(fp32)
    assert bf16[first] != fp32[first]  # bf16 rounding shows in the loss
    assert math.isclose(bf16[first], fp32[first], rel_tol=0.05)
    last = max(fp32)
    assert bf16[last] < bf16[first]  # it learns
