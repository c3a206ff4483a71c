"""Run a script under tests/public_scripts/ with the public speculators package's python."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "public_scripts"


def run_public(python: str, script: str, *args: str, timeout: int = 600) -> str:
    """Run ``script`` in the public venv from a neutral directory (``-P``: our package stays out)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([python, "-P", str(SCRIPTS / script), *map(str, args)], cwd="/", env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed in the public venv:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout
