"""Hold a stage's command at its start until the test lets it go, so a test that acts while a
stage runs (stops the broker, cancels, SIGKILLs it) cannot lose the race to a stage that ends
first on a fast machine.

The gate is a `sitecustomize` module on the worker's PYTHONPATH, which the stage's process
inherits (worker.procs.child_env). In the process that runs `python -m speculators <command>`
it writes `held.<pid>` into the gate folder and waits for the folder's `go` file; every other
process (the worker, the lifeline program, other stages) goes on at once. Once released, the
gate stays open: a stage started again later runs without waiting."""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''\
"""Written by tests/support/stage_gate.py: holds `python -m speculators $SPEC_TEST_GATE_COMMAND`."""
import os
import sys


def _hold():
    folder, command = os.environ.get("SPEC_TEST_GATE_DIR"), os.environ.get("SPEC_TEST_GATE_COMMAND")
    argv = list(getattr(sys, "orig_argv", []))
    if not folder or not command or "-m" not in argv:
        return
    at = argv.index("-m")
    if argv[at + 1:at + 3] != ["speculators", command]:
        return
    import pathlib
    import time

    gate = pathlib.Path(folder)
    (gate / f"held.{os.getpid()}").write_text("")
    while not (gate / "go").exists():
        time.sleep(0.05)


_hold()
'''


class StageGate:
    """A gate for `python -m speculators <command>` (e.g. `prepare-data`, `train`) in `folder`."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder, self.command = Path(folder), command
        (self.folder / "site").mkdir(parents=True, exist_ok=True)
        (self.folder / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` (a worker's environment) with the gate on its path."""
        path = os.pathsep.join(filter(None, [str(self.folder / "site"), base.get("PYTHONPATH", "")]))
        return {**base, "PYTHONPATH": path, "SPEC_TEST_GATE_DIR": str(self.folder),
                "SPEC_TEST_GATE_COMMAND": self.command}

    def held(self) -> int | None:
        """The pid of a process waiting at the gate (or that did), else None."""
        found = sorted(self.folder.glob("held.*"))
        return int(found[0].suffix[1:]) if found else None

    def release(self) -> None:
        (self.folder / "go").write_text("")
