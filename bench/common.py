"""Helpers shared by the benchmark scripts: machine facts, timing, results files.

Pure Python + torch, and it never imports `speculators`, because the public-package
runner (`bench/public_runner.py`) imports it from a different virtual environment
where `speculators` is the PyPI package, not ours.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or BENCH_DIR / "results")  # tests point it elsewhere


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a number: cores, load, memory, versions, commit."""
    import torch

    info: dict[str, Any] = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: line.split()[1] for line in f}
        info["mem_total_gib"] = round(int(mem["MemTotal"]) / 2**20, 1)
        info["mem_available_gib"] = round(int(mem["MemAvailable"]) / 2**20, 1)
    except (OSError, KeyError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        info["git"] = sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class RssSampler:
    """Samples this process's RSS in a thread, so a peak *within* a region is visible.

    `ru_maxrss` only ever grows, so after a big setup step it hides the training
    step's own peak; sampling every few ms catches it (a short spike can still slip
    between samples, so the figure is a lower bound).
    """

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.interval_s = interval_s
        self.peak = 0.0
        self.base = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_mib())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self.base = current_rss_mib()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mib())


@dataclass
class Timing:
    """Repeated wall-clock measurements of one thing."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def best(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    def summary(self) -> dict[str, Any]:
        s = self.seconds
        return {
            "n": len(s),
            "median_s": self.median,
            "min_s": self.best,
            "max_s": max(s) if s else float("nan"),
            "stdev_s": statistics.stdev(s) if len(s) > 1 else 0.0,
        }


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    t = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        t.seconds.append(time.perf_counter() - start)
    return t


def write_result(name: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write `results/<name>.json` (atomic rename) with the machine facts attached."""
    out_dir = Path(results_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def fmt(x: float | None, digits: int = 3) -> str:
    """Format a number with `digits` significant digits for tables."""
    if x is None:
        return "-"
    try:
        if x != x:  # nan
            return "-"
    except TypeError:
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
