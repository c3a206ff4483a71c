"""Run a pipeline's stages as subprocesses, recording each one so a rerun continues.

The record is WORK/pipeline.json (written atomically): per stage its `speculators` arguments
(the work directory written `{work}`), the process it started, a fingerprint, its status (`running` from the moment it starts, then `done` or `failed`), start
and finish times and its log. A stage's fingerprint covers its `speculators` arguments (with
the work directory written as `{work}`, and without the launcher: a run may resume under
torchrun with another process count) and the fingerprints of the stages whose outputs it reads
(`STAGE_INPUTS`), so changing a setting changes the fingerprint of the stage it feeds and of
every stage downstream of that one.

On a rerun, stage by stage (`plan`):
- done with the same fingerprint: skipped;
- started with the same fingerprint but not done (killed, failed): run again in place, where
  the command's own resume applies (regenerate skips written records, datagen written samples,
  train resumes from its latest checkpoint, prepare rebuilds an incomplete output);
- anything else with outputs on disk (a changed setting, a redone input, outputs this record
  does not know): those outputs are moved to WORK/superseded/<time>-<stage>/ first, never
  deleted, and the stage runs from scratch.
Each stage's output goes to the console and is appended to WORK/logs/<stage>.log.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from speculators import process
from speculators.atomic import atomic_write_json
from speculators.errors import UserError

RECORD = "pipeline.json"
SUPERSEDED = "superseded"


@dataclass
class Stage:
    """One step: `args` are the `speculators` arguments (what is fingerprinted), `argv` the
    process started, `inputs` the stages whose outputs it reads, `outputs` what it writes."""

    name: str
    args: list[str]
    argv: list[str]
    inputs: tuple[str, ...] = ()
    outputs: list[Path] = field(default_factory=list)


@dataclass
class Step:
    stage: Stage
    action: str  # "skip" | "resume" | "redo" | "run"
    reason: str
    fingerprint: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def normalized(args: list[str], work: Path) -> list[str]:
    """`args` with the work directory written `{work}` (a moved work directory keeps its records)."""
    root = str(work)

    def norm(value: str) -> str:
        if value == root or value.startswith(root + os.sep):
            return "{work}" + value[len(root):]
        return value

    out = []
    for tok in args:
        flag, eq, value = tok.partition("=")
        out.append(f"{flag}={norm(value)}" if eq and tok.startswith("--") else norm(tok))
    return out


def fingerprints(stages: list[Stage], work: Path) -> dict[str, str]:
    fps: dict[str, str] = {}
    for st in stages:
        body = {"args": normalized(st.args, work), "inputs": {u: fps[u] for u in st.inputs if u in fps}}
        fps[st.name] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return fps


def read_record(work: Path) -> dict[str, Any]:
    path = work / RECORD
    if not path.exists():
        return {"version": 1, "stages": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable pipeline record ({exc}); move it away to start over "
                        "(the stages' outputs then count as unknown and are moved aside)") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise UserError(f"{path}: not a pipeline record (no 'stages' mapping); move it away to start over")
    return data


def _changed_flags(old: list[str], new: list[str]) -> str:
    """`--a=1 -> --a=2` for the flags whose values differ (for the console)."""

    def split(args: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        key = args[0] if args else ""
        for tok in args[1:]:
            if tok.startswith("--"):
                key, _, value = tok.partition("=")
                out[key] = value
            else:
                out[key] = (out.get(key, "") + " " + tok).strip()
        return out

    a, b = split(old), split(new)
    parts = []
    for k in list(dict.fromkeys([*a, *b])):
        if a.get(k) != b.get(k):
            parts.append(f"{k} {a[k] if k in a else '(unset)'} -> {b[k] if k in b else '(unset)'}")
    return "; ".join(parts) or "its command line changed"


def plan(stages: list[Stage], record: dict[str, Any], work: Path) -> list[Step]:
    """What a run does with each stage, and why (pure: reads the record and the disk only)."""
    fps = fingerprints(stages, work)
    recs = record.get("stages", {})
    running: set[str] = set()
    steps: list[Step] = []
    for st in stages:
        rec = recs.get(st.name)
        fp = fps[st.name]
        redone_inputs = [u for u in st.inputs if u in running]
        on_disk = any(p.exists() or p.is_symlink() for p in st.outputs)
        if rec and rec.get("fingerprint") == fp and not redone_inputs:
            if rec.get("status") == "done":
                steps.append(Step(st, "skip", f"done at {rec.get('finished_at')}", fp))
                continue
            steps.append(Step(st, "resume", f"started at {rec.get('started_at')} but did not finish "
                              f"({rec.get('status')}); rerunning it in place", fp))
        elif rec:
            old_args, new_args = rec.get("args") or [], normalized(st.args, work)
            if old_args and old_args != new_args:
                why = "settings changed: " + _changed_flags(old_args, new_args)
            else:
                changed = redone_inputs or [u for u in st.inputs if (rec.get("inputs") or {}).get(u) != fps.get(u)
                                            and u in fps]
                why = f"its input{'s' if len(changed) > 1 else ''} {', '.join(changed) or '?'} changed"
            steps.append(Step(st, "redo" if on_disk else "run", why, fp))
        elif on_disk:
            steps.append(Step(st, "redo", f"{RECORD} has no record of its outputs on disk", fp))
        else:
            steps.append(Step(st, "run", "not run yet", fp))
        running.add(st.name)
    return steps


def move_aside(paths: list[Path], work: Path, stage: str) -> Path | None:
    """Rename what exists of `paths` into WORK/superseded/<time>-<stage>/ (nothing is deleted)."""
    present = [p for p in paths if p.exists() or p.is_symlink()]
    if not present:
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = work / SUPERSEDED / f"{stamp}-{stage}"
    n = 1
    while dest.exists():
        n += 1
        dest = work / SUPERSEDED / f"{stamp}-{stage}-{n}"
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)
    return dest


def _stream(argv: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run `argv` in the foreground (`speculators.process`), its output copied to the console
    and appended to `log_path`; its exit code.

    The stage stays in this process group, so Ctrl-C at a terminal reaches it directly (the
    trainer checkpoints on it) while this process waits for it rather than killing it; a
    SIGTERM sent to this process alone is passed on to the stage once.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {_now()} {shlex.join(argv)}\n".encode())
    proc = process.start(argv, log=log_path, env=env, foreground=True)

    def forward(signum, frame):  # noqa: ARG001
        if proc.poll() is None:
            proc.popen.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                    signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        code = proc.wait()
        proc.join_output()
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if proc.poll() is None:
            proc.stop(grace_s=0)



def display(st: Stage) -> str:
    """The stage's command as a user would type it: `speculators ARGS`, or the torchrun line."""
    if st.argv[1:3] == ["-m", "speculators"] and st.argv[3:] == st.args:
        return f"speculators {shlex.join(st.args)}"
    return shlex.join(st.argv)


class StageFailed(Exception):
    def __init__(self, stage: str, code: int, log: Path):
        what = "was interrupted" if self.interrupted(code) else "failed"
        super().__init__(f"stage '{stage}' {what} (exit {code}); its log: {log}")
        self.stage, self.code, self.log = stage, code, log

    @staticmethod
    def interrupted(code: int) -> bool:
        """Stopped by SIGINT/SIGTERM (the exit codes the trainer uses after checkpointing) or a signal."""
        return code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM)


def run_stages(stages: list[Stage], work: Path, *, log_of: Callable[[str], Path],
               say: Callable[[str], None] = print) -> dict[str, float]:
    """Run what `plan` says, recording each stage; seconds per stage run. Raises StageFailed."""
    work.mkdir(parents=True, exist_ok=True)
    record = read_record(work)
    recs = record.setdefault("stages", {})
    fps = fingerprints(stages, work)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    times: dict[str, float] = {}
    for step in plan(stages, record, work):
        st = step.stage
        if step.action == "skip":
            say(f"== {st.name}: {step.reason}; skipped (recorded in {work / RECORD})")
            continue
        if step.action in ("redo", "resume"):
            say(f"== {st.name}: {step.reason}")
        if step.action == "redo":
            dest = move_aside(st.outputs, work, st.name)
            if dest is not None:
                say(f"== {st.name}: its previous outputs moved to {dest}")
        recs[st.name] = {"status": "running", "args": normalized(st.args, work), "argv": st.argv,
                         "fingerprint": step.fingerprint,
                         "inputs": {u: fps[u] for u in st.inputs if u in fps}, "started_at": _now(),
                         "log": str(log_of(st.name))}
        atomic_write_json(work / RECORD, record)
        say(f"== {st.name}: {display(st)}")
        start = time.time()
        code = _stream(st.argv, log_of(st.name), env)
        seconds = round(time.time() - start, 1)
        if code != 0:
            recs[st.name].update(status="failed", exit_code=code, finished_at=_now(), seconds=seconds)
            atomic_write_json(work / RECORD, record)
            raise StageFailed(st.name, code, log_of(st.name))
        recs[st.name].update(status="done", exit_code=0, finished_at=_now(), seconds=seconds)
        atomic_write_json(work / RECORD, record)
        times[st.name] = seconds
        say(f"== {st.name}: done in {seconds:.1f}s")
    return times
