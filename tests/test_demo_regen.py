"""The demo regenerates by default, can be told not to, and records how in its summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speculators.cli import build_parser
from speculators.commands.demo import demo_run_settings, stage_commands
from speculators.commands.demo_extras import finish
from speculators.config.stages import StagePaths, pipeline_stages, stage_args


def _args(*extra):
    return build_parser().parse_args(["demo", "--workdir", "w", *extra])


def _parsed(argv: list[str]) -> dict:
    """What the real `speculators` parser makes of a command (its values, not its spelling)."""
    return {k: v for k, v in vars(build_parser().parse_args(argv)).items() if not callable(v)}


def test_regenerate_stage_feeds_prepare_by_default():
    args = _args()
    work = Path("w")
    stages = stage_commands(args, work)
    names = [n for n, _ in stages]
    assert names == ["model", "regenerate", "prepare", "vocab", "datagen", "train", "eval"]
    regen, prepare, ev = (_parsed(dict(stages)[n]) for n in ("regenerate", "prepare", "eval"))
    assert prepare["data"] == [regen["output"]] and regen["output"] == str(work / "regenerated.jsonl")
    assert regen["model"] == str(work / "verifier") and regen["max_samples"] == args.max_samples
    # the held-out eval skips exactly the conversations regenerate used (same seed, same count)
    assert ev["skip_samples"] == args.max_samples and ev["data_seed"] == regen["seed"] == 0


def test_demo_pipeline_commands_come_from_the_stage_builder(tmp_path):
    """The demo has no regenerate builder of its own: every pipeline stage it runs, the
    CPU-sized regenerate stage included, is what config/stages.py builds from its run settings."""
    for extra in ([], ["--no-regenerate"], ["--regen-backend", "transformers", "--regen-max-tokens", "40"]):
        args = _args(*extra)
        run = demo_run_settings(args, tmp_path / "verifier")
        built = [(n, stage_args(run, n, StagePaths(tmp_path))) for n in pipeline_stages(run)]
        stages = [(n, a) for n, a in stage_commands(args, tmp_path) if n not in ("model", "eval")]
        assert stages == built
        assert ("regenerate" in dict(stages)) == ("--no-regenerate" not in extra)


def test_demo_runs_the_same_commands_as_before(tmp_path):
    """Moving the demo's regenerate stage into the stage builder kept its commands: each parses
    to the values of the commands the demo ran before (written out here)."""
    args = _args("--seq-length", "200", "--regen-backend", "vllm", "--regen-concurrency", "32")
    work, model = tmp_path, str(tmp_path / "verifier")
    out = str(work / "regenerated.jsonl")
    before = {
        "regenerate": ["regenerate", "--model", model, "--data", "sharegpt", "--output", out, "--backend", "vllm",
                       "--max-samples", "256", "--max-tokens", "96", "--max-turns", "1", "--temperature", "0",
                       "--concurrency", "32", "--seed", "0", "--max-prompt-tokens", "136",
                       "--summary-json", str(work / "regenerate_summary.json")],
        "prepare": ["prepare-data", "--model", model, "--data", out, "--output", str(work / "prepared"),
                    "--max-samples", "256", "--seq-length", "200", "--seed", "0", "--force"],
        "vocab": ["build-vocab-mapping", "--token-freq-path", str(work / "prepared" / "token_freq.pt"),
                  "--draft-vocab-size", "256", "--target-model-path", model, "--output-path", str(work / "vocab")],
        "datagen": ["datagen", "--target-model-path", model, "--train-data-path", str(work / "prepared"),
                    "--output-dir", str(work / "hidden_states"), "--batch-size", "8", "--max-samples", "256"],
    }
    now = dict(stage_commands(args, work))
    for name, argv in before.items():
        assert _parsed(now[name]) == _parsed(argv), name


def test_no_regenerate_keeps_the_original_responses():
    args = _args("--no-regenerate")
    stages = dict(stage_commands(args, Path("w")))
    assert "regenerate" not in stages
    prepare = _parsed(stages["prepare"])
    assert prepare["data"] == ["sharegpt"] and prepare["force"] is False


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
