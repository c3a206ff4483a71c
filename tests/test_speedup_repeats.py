"""`eval --measure-speedup --repeats`: how R passes per level combine, and the order in which
two running servers' passes alternate. Checked against numpy and against brute force, not
against the functions themselves; the real servers are in tests/test_eval_speedup.py."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from speculators.cli import main
from speculators.errors import UserError


def _pass(tps: float, ttft: float, tpot: float, concurrency: int = 4) -> dict:
    return {"concurrency": concurrency, "requests": 16, "errors": 0, "output_tokens": 1024, "wall_s": 1024 / tps,
            "output_tokens_per_s": tps, "ttft_ms": {"mean": ttft, "median": ttft, "p90": ttft},
            "tpot_ms": {"mean": tpot, "median": tpot, "p90": tpot}}


BASE = [(400.0, 40.0, 8.0), (120.0, 210.0, 30.0), (450.0, 35.0, 7.5), (380.0, 50.0, 9.0)]
SPEC = [(300.0, 120.0, 11.0), (290.0, 118.0, 11.5), (100.0, 400.0, 40.0), (310.0, 110.0, 10.0)]


def test_repeats_combine_as_medians_with_their_spread():
    from speculators.vllm.speedup import combine_runs

    level = combine_runs([_pass(*r) for r in BASE])
    tps = np.array([r[0] for r in BASE])
    assert level["repeats"] == 4 and level["concurrency"] == 4
    assert level["output_tokens_per_s"] == pytest.approx(np.median(tps))
    assert level["output_tokens_per_s_runs"] == list(tps)
    assert level["output_tokens_per_s_spread"] == pytest.approx((tps.max() - tps.min()) / np.median(tps))
    for key, col in (("ttft_ms", 1), ("tpot_ms", 2)):
        means = np.array([r[col] for r in BASE])
        assert level[key]["mean"] == pytest.approx(np.median(means))
        assert level[key]["mean_runs"] == list(means)
        assert level[key]["spread"] == pytest.approx(np.ptp(means) / np.median(means))
    assert [r["output_tokens_per_s"] for r in level["runs"]] == list(tps)  # every pass kept


def test_the_speedup_is_the_median_of_paired_ratios_with_their_range():
    """Repeat i's speculative pass over repeat i's baseline pass (they ran side by side): here the
    median of the ratios differs from the ratio of the medians, so pairing is what is checked."""
    from speculators.vllm.speedup import build_speedup_report, combine_runs, LoadSettings

    base = combine_runs([_pass(*r) for r in BASE])
    spec = combine_runs([_pass(*r) for r in SPEC])
    spec["acceptance"] = {"mean_acceptance_length": 2.5}
    ratios = np.array([s[0] for s in SPEC]) / np.array([b[0] for b in BASE])
    assert np.median(ratios) != pytest.approx(np.median([s[0] for s in SPEC]) / np.median([b[0] for b in BASE]))
    report = build_speedup_report({"endpoint": "b", "model": "m", "levels": [base]},
                                  {"endpoint": "s", "model": "m", "levels": [spec],
                                   "acceptance_report": {"num_speculative_tokens": 3}},
                                  LoadSettings((4,), repeats=4), 16, interleaved=True)
    cmp = report["speedup"]["comparison"][0]
    assert report["measured_speedup"] == cmp["measured_speedup"] == pytest.approx(np.median(ratios))
    assert cmp["measured_speedup_runs"] == pytest.approx(list(ratios))
    assert cmp["measured_speedup_range"] == pytest.approx([ratios.min(), ratios.max()])
    assert cmp["measured_speedup_spread"] == pytest.approx(np.ptp(ratios) / np.median(ratios))
    assert cmp["tpot_speedup"] == pytest.approx(np.median([b[2] for b in BASE]) / np.median([s[2] for s in SPEC]))
    assert report["speedup"]["repeats"] == 4 and report["speedup"]["interleaved"] is True

    from speculators.vllm.speedup import format_speedup

    table = format_speedup(report)
    lo, hi = ratios.min(), ratios.max()
    assert f"{np.median(ratios):.2f}x ({lo:.2f}-{hi:.2f})" in table
    assert f"{np.median([b[0] for b in BASE]):.1f} ({100 * np.ptp([b[0] for b in BASE]) / np.median([b[0] for b in BASE]):.0f}%)" in table
    assert "4 repeat(s) per level" in table and "interleaved" in table


@pytest.mark.parametrize("repeats", [1, 2, 3, 4, 6])
def test_interleaved_passes_alternate_and_cancel_a_linear_drift(repeats):
    from speculators.vllm.speedup import interleave_order, sequential_order

    order = interleave_order(repeats)
    assert len(order) == 2 * repeats
    # each repeat is one baseline and one speculative pass, next to each other
    for r in range(repeats):
        assert sorted(name for rr, name in order[2 * r: 2 * r + 2] if rr == r) == ["baseline", "speculative"]
    # never the same server three times running (B S S B B S ...)
    names = [name for _, name in order]
    assert max(len(list(g)) for _, g in itertools.groupby(names)) <= 2
    assert names[0] == "baseline"
    # a load that grows linearly with time: over an even number of repeats both servers see the
    # same total (sum of their pass positions), brute force over the order
    if repeats % 2 == 0:
        pos_b = sum(i for i, n in enumerate(names) if n == "baseline")
        pos_s = sum(i for i, n in enumerate(names) if n == "speculative")
        assert pos_b == pos_s
    assert sequential_order(repeats, "speculative") == [(r, "speculative") for r in range(repeats)]


def test_concurrent_servers_get_two_ports(tmp_path):
    from speculators.vllm.launch import flag_value
    from speculators.vllm.speedup import plan_pair

    info = {"verifier": "org/remote-verifier", "num_speculative_tokens": 3}
    ckpt = Path(tmp_path)
    one = plan_pair(ckpt, info, "0.32.0", ["--enforce-eager"], kv_cache_gib=1)
    assert flag_value(one.baseline.argv, ["--port"]) == flag_value(one.speculative.argv, ["--port"])
    both = plan_pair(ckpt, info, "0.32.0", ["--enforce-eager"], kv_cache_gib=1, concurrent=True)
    ports = {flag_value(both.baseline.argv, ["--port"]), flag_value(both.speculative.argv, ["--port"])}
    assert len(ports) == 2 and both.baseline.url != both.speculative.url
    for cmd in (both.baseline, both.speculative):
        assert cmd.url.endswith(":" + flag_value(cmd.argv, ["--port"]))
    with pytest.raises(UserError, match="--concurrent-servers starts two servers"):
        plan_pair(ckpt, info, "0.32.0", ["--port", "8000"], kv_cache_gib=1, concurrent=True)


def test_repeats_must_be_positive(capsys):
    assert main(["eval", "--measure-speedup", "--checkpoint", "x", "--data", "sharegpt", "--repeats", "0"]) == 2
    assert "--repeats 0: must be >= 1" in capsys.readouterr().err
