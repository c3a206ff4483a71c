"""Shared runner of the seed examples: prepare-data -> build-vocab-mapping -> datagen -> train -> eval.

Each example (gpt_oss_20b.py, llama3_8b.py, qwen3_8b.py) names the real verifier and its
recipe for a GPU host; ``--tiny`` swaps in a CPU stand-in of the same architecture and chat
template family, built locally (no hub), with a few dozen samples, so the whole recipe runs
in about a minute. ``--dry-run`` prints the commands instead of running them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Recipe:
    data: list[str]
    max_samples: int
    seq_length: int
    draft_vocab_size: int
    epochs: int
    lr: float
    ttt_steps: int = 3
    eval_prompts: int = 64
    max_new_tokens: int = 256
    datagen_backend: str = "vllm"
    prepare_flags: list[str] = field(default_factory=list)


@dataclass
class Example:
    name: str
    model: str  # the real verifier (hub id)
    recipe: Recipe  # the GPU recipe
    tiny_recipe: Recipe  # the CPU stand-in's recipe
    build_tiny: Callable[[Path], Path]  # writes the stand-in verifier, returns its directory


def stages(model: str, r: Recipe, work: Path) -> list[list[str]]:
    prep, vocab, hs, ckpt = work / "prepared", work / "vocab", work / "hidden_states", work / "checkpoints"
    sources = [d.format(work=work) for d in r.data]  # "{work}": a file the stand-in wrote there
    data = [x for d in sources for x in ("--data", d)]
    return [
        ["prepare-data", "--model", model, *data, "--output", str(prep), "--max-samples", str(r.max_samples),
         "--seq-length", str(r.seq_length), *r.prepare_flags],
        ["build-vocab-mapping", "--token-freq-path", str(prep / "token_freq.pt"), "--draft-vocab-size",
         str(r.draft_vocab_size), "--target-model-path", model, "--output-path", str(vocab)],
        ["datagen", "--target-model-path", model, "--train-data-path", str(prep), "--output-dir", str(hs),
         "--backend", r.datagen_backend],
        ["train", "--verifier-name-or-path", model, "--data-path", str(hs), "--save-path", str(ckpt),
         "--epochs", str(r.epochs), "--lr", str(r.lr), "--ttt-steps", str(r.ttt_steps),
         "--d2t-path", str(vocab / "d2t.npy"), "--t2d-path", str(vocab / "t2d.npy"),
         "--draft-vocab-size", str(r.draft_vocab_size), "--total-seq-len", str(2 * r.seq_length)],
        ["eval", "--checkpoint", str(ckpt / "checkpoint_best"), "--verifier", model, "--data", sources[0].split(",")[0],
         "--skip-samples", str(r.max_samples), "--seq-length", str(r.seq_length), "--num-prompts",
         str(r.eval_prompts), "--max-new-tokens", str(r.max_new_tokens), "--num-speculative-tokens",
         str(r.ttt_steps), "--output-json", str(work / "eval.json")],
    ]


def main(example: Example, argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=f"Train an EAGLE-3 draft for {example.model}.")
    ap.add_argument("--tiny", action="store_true", help="CPU stand-in of the same architecture and template")
    ap.add_argument("--work", default=f"examples-output/{example.name}", help="output directory")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = ap.parse_args(argv)
    work = Path(a.work)
    recipe = example.tiny_recipe if a.tiny else example.recipe
    model = str(work / "verifier") if a.tiny else example.model
    commands = stages(model, recipe, work)
    if a.dry_run:
        for c in commands:
            print("speculators " + shlex.join(c))
        return None
    from speculators.cli import main as cli

    work.mkdir(parents=True, exist_ok=True)
    if a.tiny and not (work / "verifier" / "config.json").is_file():
        example.build_tiny(work / "verifier")
    for c in commands:
        print("+ speculators " + shlex.join(c), flush=True)
        rc = cli(c)
        if rc != 0:
            sys.exit(f"{example.name}: `speculators {c[0]}` failed with exit code {rc}")
    report = json.loads((work / "eval.json").read_text())
    print(f"{example.name}: mean acceptance length {report['mean_acceptance_length']:.2f}")
    return report


def tiny_family_verifier(out: Path, family: str, arch: str) -> Path:
    """A tiny verifier with one of the chat-template families of `speculators.tiny.families`."""
    if arch in ("gpt_oss", "qwen3_moe"):
        from speculators.tiny.moe import build_tiny_moe_verifier

        return build_tiny_moe_verifier(out, arch)
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from speculators.tiny.builders import tiny_config
    from speculators.tiny.families import end_of_turn, family_tokenizer

    tok = family_tokenizer(family)
    eos = sorted(end_of_turn(tok, family))
    torch.manual_seed(0)
    config = tiny_config(len(tok), arch=arch, eos_token_id=eos[0], pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


TINY = dict(max_samples=32, seq_length=256, draft_vocab_size=256, epochs=2, lr=3e-3, eval_prompts=4,
            max_new_tokens=16, datagen_backend="transformers")
