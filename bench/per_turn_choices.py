"""Measure the prepare-data choices of issue 14 by acceptance: rows per conversation or per
turn, the newline after ChatML's <|im_end|> trained or not, an opening assistant turn kept as
context or dropped. CPU, tiny pretrained ChatML (Qwen3-architecture) verifier, ShareGPT.

Each variant: prepare-data -> datagen -> train (same epochs) -> eval (greedy, held-out
ShareGPT prompts, mean acceptance length). Prints a JSON list of results.

    PYTHONPATH=. python bench/per_turn_choices.py --work /tmp/ptc [--samples 160 --epochs 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    # name: (prepare-data flags, drop opening assistant turns from the records beforehand)
    "per-conversation, opening assistant as context": (["--opening-assistant", "context"], False),
    "per-conversation, opening assistant dropped": (["--opening-assistant", "context"], True),
    "per-turn (opening assistant as context)": (["--rows", "per-turn"], False),
    "per-turn + newline after <|im_end|> (public)": (["--rows", "per-turn", "--train-after-end-of-turn"], False),
}


def sharegpt_jsonl(path: Path, n: int, drop_opening: bool) -> tuple[Path, int]:
    from speculators.data.sharegpt import iter_sharegpt

    opening = 0
    with path.open("w") as f:
        for record in iter_sharegpt(limit=n):
            turns = list(record.get("conversations") or [])
            if turns and turns[0].get("from") == "gpt":
                opening += 1
                if drop_opening:
                    while turns and turns[0].get("from") == "gpt":
                        turns = turns[1:]
            f.write(json.dumps({"conversations": turns}) + "\n")
    return path, opening


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--samples", type=int, default=160, help="ShareGPT conversations to train on")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    a = ap.parse_args(argv)

    from speculators.cli import main as cli
    from speculators.tiny.builders import build_tiny_verifier

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    verifier = work / "verifier"
    if not (verifier / "config.json").is_file():
        build_tiny_verifier(verifier, arch="qwen3", template="chatml", pretrain_steps=a.pretrain_steps)
    results = []
    for name, (flags, drop) in VARIANTS.items():
        start = time.time()
        slug = "".join(c if c.isalnum() else "_" for c in name)[:40]
        d = work / slug
        d.mkdir(exist_ok=True)
        data, opening = sharegpt_jsonl(d / "train.jsonl", a.samples, drop)
        assert cli(["prepare-data", "--model", str(verifier), "--data", str(data), "--output", str(d / "prep"),
                    "--seq-length", str(a.seq_length), *flags]) == 0
        assert cli(["datagen", "--target-model-path", str(verifier), "--train-data-path", str(d / "prep"),
                    "--output-dir", str(d / "hs"), "--device", "cpu"]) == 0
        assert cli(["train", "--verifier-name-or-path", str(verifier), "--data-path", str(d / "hs"),
                    "--save-path", str(d / "run"), "--epochs", str(a.epochs), "--lr", "3e-3",
                    "--total-seq-len", str(a.seq_length), "--num-layers", "1", "--log-freq", "1000"]) == 0
        # Held-out prompts: ShareGPT conversations after the training ones, tokenized like prepare-data.
        assert cli(["eval", "--checkpoint", str(d / "run"), "--data", "sharegpt", "--skip-samples",
                    str(a.samples + 40), "--num-prompts", str(a.eval_prompts), "--max-new-tokens", "48",
                    "--max-prompt-len", "128", "--device", "cpu", "--output-json", str(d / "eval.json")]) == 0
        report = json.loads((d / "eval.json").read_text())
        meta = json.loads((d / "prep" / "prepare_config.json").read_text())["counts"]
        results.append({"variant": name, "rows": meta["kept"], "tokens": meta["total_tokens"],
                        "trained_tokens": meta["assistant_tokens"], "opening_assistant_convs": opening,
                        "mean_acceptance_length": report["mean_acceptance_length"],
                        "seconds": round(time.time() - start, 1)})
        print(json.dumps(results[-1]), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
