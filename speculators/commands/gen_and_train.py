"""`speculators gen-and-train` (alias `gen_and_train`): the whole pipeline for any verifier.

[regenerate] -> prepare-data -> build-vocab-mapping -> datagen -> train -> eval, from one set
of flags or a `--config` file (YAML or JSON, the same settings; flags given override it). The
stages' command lines come from the stage builder the dashboard's worker uses
(speculators.config.stages), and each runs as its own `speculators` process (train under
torchrun with --nproc-per-node > 1), its output on the console and in WORK/logs/<stage>.log.

Each finished stage is recorded in WORK/pipeline.json. Rerun the same command after a failure
or a kill and it continues: finished stages are skipped, an unfinished one reruns in place
(train resumes from its latest checkpoint). A changed setting redoes the stage it feeds and
every stage that reads that stage's output; their previous outputs are moved to
WORK/superseded/, never deleted. --dry-run prints the commands and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any, Callable

from speculators.commands.stage_runner import Stage, StageFailed, plan, read_record, run_stages
from speculators.config.base import add_arguments
from speculators.config.files import CONFIG_HELP
from speculators.config.gen_and_train import DEFAULT_CONFIG_NAMES, GenTrainConfig
from speculators.config.run import RunSettings
from speculators.config.stages import STAGE_INPUTS, StagePaths, eval_args, launch_argv, pipeline_stages, stage_args
from speculators.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gen-and-train",
        aliases=["gen_and_train"],
        help="run regenerate -> prepare -> vocab -> datagen -> train -> eval for any verifier, resumable",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"{CONFIG_HELP}. Without it, ./{DEFAULT_CONFIG_NAMES[0]} (or .yml/.json) is read when present")
    p.add_argument("--dry-run", action="store_true", help="print each stage's command, one per line; run nothing")
    add_arguments(p, GenTrainConfig)
    # required settings may also come from ./gen_and_train.yaml: the schema checks them (flag or file)
    for action in p._actions:
        if action.dest in GenTrainConfig.model_fields:
            action.required = False
    p.set_defaults(func=run, default_settings_files=DEFAULT_CONFIG_NAMES)


def build_stages(cfg: GenTrainConfig, *, python: str = sys.executable) -> list[Stage]:
    """The pipeline's stages for these settings, in order (pure)."""
    return run_stages_for(cfg.run_settings(), StagePaths(cfg.work_path), extra_of=cfg.stage_extra,
                          eval_prompts=cfg.eval_prompts if cfg.eval else None,
                          torchrun_procs=cfg.nproc_per_node if cfg.nproc_per_node > 1 else None, python=python)


def run_stages_for(run: RunSettings, paths: StagePaths, *, eval_prompts: int | None,
                   extra_of: Callable[[str], dict[str, Any]] = lambda stage: {},
                   torchrun_procs: int | None = None, python: str = sys.executable) -> list[Stage]:
    """The stages of an offline run (the stage builder's commands, then eval unless
    `eval_prompts` is None), as processes to start: `gen-and-train` and `demo` both run these."""
    stages = []
    for name in pipeline_stages(run):
        args = stage_args(run, name, paths, extra=extra_of(name))
        stages.append(Stage(name, args, launch_argv(args, python=python, torchrun_procs=torchrun_procs),
                            STAGE_INPUTS[name], paths.outputs(name)))
    if eval_prompts is not None:
        args = eval_args(run, paths, num_prompts=eval_prompts)
        stages.append(Stage("eval", args, launch_argv(args, python=python), STAGE_INPUTS["eval"],
                            paths.outputs("eval")))
    return stages


def run(args: argparse.Namespace) -> int:
    try:
        cfg = GenTrainConfig.from_args(args)
    except UserError as exc:
        where = f" (flags and --config {args.config})" if args.config else \
            f" (give it as a flag, or write it in ./{DEFAULT_CONFIG_NAMES[0]} or a --config file)"
        raise UserError(f"{exc}{where}") from None
    work = cfg.work_path
    if work.exists() and not work.is_dir():
        raise UserError(f"--work-dir {work} exists and is not a directory")
    stages = build_stages(cfg)
    if args.dry_run:
        record = read_record(work) if work.is_dir() else {"stages": {}}
        for step in plan(stages, record, work):
            verb = {"skip": "would skip", "resume": "would rerun in place", "redo": "would redo",
                    "run": "would run"}[step.action]
            print(f"# {step.stage.name}: {verb} ({step.reason})", file=sys.stderr)
            print(shlex.join(step.stage.argv))
        return 0
    paths = StagePaths(work)
    try:
        times = run_stages(stages, work, log_of=paths.log, say=lambda line: print(line, flush=True))
    except StageFailed as exc:
        todo = "Rerun" if StageFailed.interrupted(exc.code) else "Fix the cause and rerun"
        print(f"gen-and-train stopped: {exc}. {todo} the same command: finished stages are kept and skipped.",
              file=sys.stderr)
        return exc.code if exc.code > 0 else 128 - exc.code
    print(f"\ngen-and-train finished in {work}/ (stages run now: "
          f"{', '.join(f'{k} {v:.0f}s' for k, v in times.items()) or 'none, all were done'})")
    print(f"best checkpoint: {paths.checkpoints / 'checkpoint_best'}")
    if cfg.eval and paths.eval_report.is_file():
        report = json.loads(paths.eval_report.read_text())
        print(f"mean acceptance length at K={cfg.ttt_steps} on {report.get('num_prompts', cfg.eval_prompts)} "
              f"held-out prompts: {report['mean_acceptance_length']:.3f} ({paths.eval_report})")
    print(f"serve it with:  speculators serve {paths.checkpoints / 'checkpoint_best'}")
    return 0

