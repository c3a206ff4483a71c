"""Compose's init service on CPU hosts (compose.cpu.yaml): write the tiny default verifier
that the form suggests, once, as the local mode does on its first start.

    python -m worker.tinyinit        # the model is $SPEC_DEFAULT_MODEL; exits 0 when it is there

Same files as the local mode's background build (worker/tinybuild.py: status, log, the
`.building` folder renamed into place only when complete), so the dashboard shows its
progress or its error, and a build killed half way is never taken for a model. Does
nothing when the model exists or `SPEC_DEFAULT_MODEL` is a hub id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from worker.local import needs_tiny_model, tiny_build_argv
from worker.tinybuild import building_dir, last_line, log_file, write_status


def ensure_tiny_model(env: dict[str, str]) -> int:
    if not needs_tiny_model(env):
        print(f"verifier {env['SPEC_DEFAULT_MODEL']}: nothing to build", flush=True)
        return 0
    model = Path(env["SPEC_DEFAULT_MODEL"])
    tmp = building_dir(model)
    if tmp.exists():
        shutil.rmtree(tmp)  # a build that was killed: start over
    log = log_file(model)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    write_status(model, "building", started=started)
    print(f"writing the tiny CPU verifier to {model} (log: {log})", flush=True)
    with open(log, "wb") as out:
        rc = subprocess.run(tiny_build_argv(env), env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc == 0 and (tmp / "config.json").is_file():
        tmp.rename(model)
        write_status(model, "done", started=started)
        print(f"tiny verifier ready in {model}", flush=True)
        return 0
    why = last_line(log) or f"exit code {rc}"
    write_status(model, "failed", started=started, error=f"{why} (exit code {rc})")
    print(f"error: building the tiny verifier failed: {why}", file=sys.stderr, flush=True)
    return rc or 1


if __name__ == "__main__":
    sys.exit(ensure_tiny_model(dict(os.environ)))
