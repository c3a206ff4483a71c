"""The hidden-state files vLLM's ExampleHiddenStatesConnector writes.

One safetensors file per request, at the path the server returns in
``kv_transfer_params["hidden_states_path"]`` (``<shared_storage_path>/<req_id>.safetensors``):
``token_ids [L]`` (the prompt) and ``hidden_states [L, K, H]`` (K = the requested
layer ids, in order). The connector writes asynchronously and holds an exclusive
``flock`` on ``<path>.lock`` until the file is complete, so a reader takes a shared
lock on it first.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import torch

from speculators.vllm.retry import InvalidResponseError, TransientServerError


def lock_path(path: str | os.PathLike) -> str:
    return str(path) + ".lock"


def write_hidden_states_file(path: str | os.PathLike, token_ids: torch.Tensor, hidden_states: torch.Tensor) -> None:
    """Write a file the way the connector does (lock held while writing); for the test server."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(path), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        save_file(
            {"token_ids": token_ids.contiguous(), "hidden_states": hidden_states.contiguous()}, str(path)
        )
    finally:
        os.close(fd)


def read_hidden_states_file(path: str | os.PathLike, lock_timeout_s: float = 60.0) -> dict[str, torch.Tensor]:
    """Wait for the writer's lock (if any), then load ``{"token_ids", "hidden_states"}``.

    A missing file or a lock still held after ``lock_timeout_s`` is transient (the
    writer is slow or the server restarted mid-write), so the caller may re-request.
    """
    from safetensors.torch import load_file

    path = str(path)
    lpath = lock_path(path)
    if os.path.exists(lpath):
        try:
            fd = os.open(lpath, os.O_RDONLY)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                deadline = time.monotonic() + lock_timeout_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TransientServerError(
                                f"{path}: writer still holds {lpath} after {lock_timeout_s:g}s"
                            ) from None
                        time.sleep(0.01)
            finally:
                os.close(fd)
    if not os.path.exists(path):
        raise TransientServerError(
            f"{path} does not exist: the trainer must see the directory vLLM writes to "
            "(launch-vllm --hidden-states-path) on the same filesystem"
        )
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # truncated / foreign file
        raise InvalidResponseError(f"{path}: unreadable hidden-state file ({exc})") from exc


def remove_hidden_states_file(path: str | os.PathLike) -> None:
    """Delete the file and its lock (both may already be gone)."""
    for p in (str(path), lock_path(path)):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def check_payload(payload: dict[str, Any], token_ids: list[int], num_layers: int | None, where: str) -> torch.Tensor:
    """Validate a loaded file against the request; return ``hidden_states [L, K, H]``."""
    for key in ("token_ids", "hidden_states"):
        if key not in payload:
            raise InvalidResponseError(f"{where}: lacks {key!r}")
    got = payload["token_ids"].tolist()
    if got != list(token_ids):
        raise InvalidResponseError(
            f"{where}: token_ids differ from the request (got {len(got)} tokens, sent {len(token_ids)})"
        )
    hs = payload["hidden_states"]
    if hs.ndim != 3 or hs.shape[0] != len(token_ids):
        raise InvalidResponseError(
            f"{where}: hidden_states shape {tuple(hs.shape)}, expected [{len(token_ids)}, K, H]"
        )
    if num_layers is not None and hs.shape[1] != num_layers:
        raise InvalidResponseError(
            f"{where}: holds {hs.shape[1]} layers, expected {num_layers}: the server was launched with "
            "other --target-layer-ids than training uses"
        )
    if not torch.isfinite(hs).all():
        raise InvalidResponseError(f"{where}: hidden_states contain NaN or Inf")
    return hs


# What `launch-vllm` records next to the files vLLM writes, so a client can check the
# layer ids by value (the files themselves carry only [L, K, H]).
SERVER_INFO_NAME = "speculators_server.json"


def write_server_info(directory: str | os.PathLike, model: str, layer_ids: list[int]) -> Path:
    import json

    path = Path(directory) / SERVER_INFO_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": model, "layer_ids": [int(i) for i in layer_ids]}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_server_info(hidden_states_file: str | os.PathLike) -> dict[str, Any] | None:
    """The server record in the directory of a file vLLM wrote, or None (no launch-vllm record)."""
    import json

    path = Path(hidden_states_file).parent / SERVER_INFO_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
