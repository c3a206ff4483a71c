"""The seed examples run end to end with their --tiny CPU stand-ins, and print GPU commands."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.mark.parametrize("name", ["gpt_oss_20b", "llama3_8b", "qwen3_8b"])
def test_tiny_example_runs(name, tmp_path):
    module = importlib.import_module(name)
    report = module.main(module.EXAMPLE, ["--tiny", "--work", str(tmp_path / name)])
    assert report["num_prompts"] == 4 and report["generated_tokens"] > 0
    assert report["mean_acceptance_length"] >= 1.0
    prep = (tmp_path / name / "prepared" / "prepare_config.json").read_text()
    if name == "qwen3_8b":
        import json

        sources = json.loads(prep)["sources"]
        assert [s["kept"] for s in sources] == [16, 16]  # --max-samples 32 split 1:1


def test_dry_run_prints_the_gpu_recipe(capsys):
    module = importlib.import_module("qwen3_8b")
    assert module.main(module.EXAMPLE, ["--dry-run", "--work", "/w"]) is None
    out = capsys.readouterr().out
    assert "--model Qwen/Qwen3-8B --data sharegpt,weight=1 --data ultrachat,weight=1" in out
    assert "--backend vllm" in out and out.count("speculators ") == 5
    del sys.modules["qwen3_8b"]
