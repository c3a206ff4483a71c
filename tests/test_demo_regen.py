"""The demo regenerates by default, can be told not to, and records how in its summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speculators.cli import build_parser
from speculators.commands.demo import stage_commands
from speculators.commands.demo_extras import finish, with_regeneration


def _args(*extra):
    return build_parser().parse_args(["demo", "--workdir", "w", *extra])


def test_regenerate_stage_feeds_prepare_by_default():
    args = _args()
    work = Path("w")
    stages = with_regeneration(stage_commands(args, work), args, work)
    names = [n for n, _ in stages]
    assert names.index("regenerate") == names.index("prepare") - 1
    regen = dict(stages)["regenerate"]
    prepare = dict(stages)["prepare"]
    out = regen[regen.index("--output") + 1]
    assert f"--data={out}" in prepare and out == str(work / "regenerated.jsonl")  # stage builder writes --flag=value
    assert regen[regen.index("--model") + 1] == str(work / "verifier")
    assert regen[regen.index("--max-samples") + 1] == str(args.max_samples)
    # the held-out eval skips exactly the conversations regenerate used (same seed, same count)
    ev = dict(stages)["eval"]
    assert ev[ev.index("--skip-samples") + 1] == str(args.max_samples)
    assert ev[ev.index("--data-seed") + 1] == regen[regen.index("--seed") + 1] == "0"
    # every argv parses as the real command
    for _, argv in stages:
        build_parser().parse_args(argv)


def test_no_regenerate_keeps_the_original_responses():
    args = _args("--no-regenerate")
    work = Path("w")
    assert with_regeneration(stage_commands(args, work), args, work) == stage_commands(args, work)


def test_summary_records_regeneration_and_both_acceptance_figures(tmp_path, capsys):
    args = _args("--regen-backend", "vllm")
    report = {"mean_acceptance_length": 2.61, "acceptance_rate_per_position": [0.7, 0.5, 0.4]}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    (tmp_path / "regenerate_summary.json").write_text(json.dumps({"written": 256, "tokens_per_s": 99.0}))
    from speculators.evaluate.streams import write_streams

    same = {"prompt_ids": [1, 2], "tokens": [5, 6, 7]}
    write_streams(tmp_path / "streams_pytorch.jsonl", [dict(same, accepted=[2]), same])
    write_streams(tmp_path / "streams_vllm.jsonl", [same, dict(same, tokens=[5, 9, 7])])
    finish(args, tmp_path, {"train": 1.0}, dict(report, mean_acceptance_length=2.58))
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["regenerated"] is True
    assert summary["regeneration"]["backend"] == "vllm"
    assert summary["regeneration"]["summary"]["written"] == 256
    assert summary["acceptance_length"] == {"pytorch": 2.61, "vllm": 2.58}
    assert summary["token_streams"] == {"prompts": 2, "prompt_ids_equal": 2, "tokens_equal": 1,
                                        "first_difference": {"prompt": 1, "position": 1, "a": [6, 7], "b": [9, 7]}}
    out = capsys.readouterr().out
    assert "PyTorch 2.610, vLLM 2.580 (difference 0.030)" in out
    assert "generated ids equal on 1/2 (first difference: prompt 1, token 1)" in out


def test_stream_comparison_counts_prompt_and_token_differences():
    from speculators.errors import UserError
    from speculators.evaluate.streams import compare_streams

    a = [{"prompt_ids": [1], "tokens": [3, 4]}, {"prompt_ids": [2], "tokens": [3, 4]}]
    b = [{"prompt_ids": [1, 1], "tokens": [3, 4]}, {"prompt_ids": [2], "tokens": [3]}]
    got = compare_streams(a, b)
    assert (got["prompt_ids_equal"], got["tokens_equal"]) == (1, 1)
    assert got["first_difference"] == {"prompt": 1, "position": 1, "a": [4], "b": []}  # shorter counts as a difference
    assert compare_streams(a, a)["first_difference"] is None
    with pytest.raises(UserError, match="2 and 1 prompts"):
        compare_streams(a, b[:1])
