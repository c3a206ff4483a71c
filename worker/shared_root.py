"""Whether this host sees the installation's shared runs root, checked before a stage runs.

On a host that joins an installation (SPEC_REQUIRE_SHARED_ROOT=1) the runs root is a shared
filesystem (NFS in production) that the main host marks with `runstore.settings.ROOT_MARKER`.
When the mount is missing the folder is empty (or absent), the marker is not there, and the
stage fails at once with this message: nothing is written under the empty mount point, so a
stage never runs on files the other hosts cannot see.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from runstore.settings import ROOT_MARKER, Settings


def shared_root_problem(settings: Settings, work_dir: str | Path, host: str | None = None) -> str | None:
    """The message that says why this host cannot run a stage in `work_dir`, or None. Only a
    joining worker (require_shared_root) checks; the main host's own folders need no proof."""
    if not settings.require_shared_root:
        return None
    host = host or socket.gethostname()
    root = settings.runs_root
    where = f"SPEC_RUNS_ROOT={root} on host {host}"
    if not root.is_dir():
        return (f"the shared runs root {where} does not exist: mount the installation's shared root "
                "there (docs/scaling.md); nothing was written")
    if not (root / ROOT_MARKER).is_file():
        return (f"the shared runs root {where} is not mounted (no {ROOT_MARKER}, which the main host "
                "writes there): mount the installation's shared root there (docs/scaling.md); nothing was written")
    work = Path(work_dir)
    if not work.is_relative_to(root):
        return (f"the run's folder {work} is outside {where}: this worker's SPEC_RUNS_ROOT must be the "
                "main host's path (mount the shared root at the same path on every host)")
    probe = work if work.exists() else root
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"{probe} is not writable by uid {os.getuid()} on host {host}: give the workers' uid write "
                "access to the shared root (docs/scaling.md)")
    return None
