"""Atomic file writes: write a temporary sibling, then rename it onto the target.

Readers (a dashboard polling a report, a resume reading run.json, a loader reading a
sample) see either the old file or the whole new one, never half of it.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, writer: Callable[[str], Any]) -> None:
    """Call `writer(tmp_path)` then rename the temporary file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write_bytes(path, _write)


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """`obj` as indented JSON plus a newline (`dumps_kwargs`, e.g. `default=str`, go to json.dumps)."""
    atomic_write_text(path, json.dumps(obj, indent=2, **dumps_kwargs) + "\n")


def atomic_symlink(link: str | os.PathLike, target: str) -> None:
    """Point `link` at `target` (relative names stay relative), replacing any old link."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    os.replace(tmp, link)
