"""Prompt sets with categories: a JSON-lines file of prompts, each optionally labelled.

One object per line: ``{"prompt": "text", "category": "math"}`` (a single user turn), or
``{"messages": [...], "category": "code"}`` / ``{"conversations": [...]}`` in any turn layout
prepare-data reads (the prompt ends where the first assistant turn starts; a conversation
without one is all prompt). ``category`` is optional ("uncategorized" when absent). The prompt
is the chat template's rendering of those turns with the generation prompt, the tokens the
verifier sees before it replies, as a prepared row's tokens before its first assistant token.

A ``.jsonl`` file is read this way when its first object has a ``prompt`` or ``category`` key;
otherwise it is a conversation source as before (`speculators.evaluate.runner.load_prompts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speculators.errors import UserError

UNCATEGORIZED = "uncategorized"
_MARKERS = ("prompt", "category")


@dataclass(frozen=True)
class PromptSet:
    """Token-id prompts and, per prompt, its category (None: the source has no categories)."""

    prompts: list[list[int]]
    categories: list[str] | None = None


def _first_object(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def is_prompt_set(data: str | Path) -> bool:
    """A ``.jsonl`` file whose first object has a ``prompt`` or ``category`` key."""
    path = Path(str(data))
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    first = _first_object(path)
    return isinstance(first, dict) and any(key in first for key in _MARKERS)


def record_messages(record: Any, where: str) -> list[dict[str, Any]]:
    """The turns before the first assistant turn (``prompt``: one user turn)."""
    from speculators.data.sources import BadConversation, normalize_record

    if not isinstance(record, dict):
        raise UserError(f"{where}: not a JSON object")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string")
        return [{"role": "user", "content": record["prompt"]}]
    key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
    if key is None or not isinstance(record[key], list):
        raise UserError(f"{where}: needs 'prompt' (a string) or 'messages' / 'conversations' (a list of turns)")
    closing = {"role": "assistant", "content": ""}  # so normalize_record accepts a prompt-only conversation
    try:
        messages = normalize_record({key: [*record[key], closing]})
    except BadConversation as exc:
        raise UserError(f"{where}: {exc}") from None
    cut = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if cut == 0:
        raise UserError(f"{where}: the conversation starts with an assistant turn; there is no prompt")
    return messages[:cut]


def record_category(record: dict[str, Any], where: str) -> str:
    value = record.get("category", UNCATEGORIZED)
    if not isinstance(value, (str, int)) or str(value).strip() == "":
        raise UserError(f"{where}: 'category' must be a non-empty string")
    return str(value)


def load_prompt_set(path: str | Path, tokenizer_path: str, limit: int | None = None, skip: int = 0,
                    max_prompt_len: int | None = None) -> PromptSet:
    """Read and tokenize a prompt set (file order; ``skip`` lines with a prompt, then at most ``limit``)."""
    from speculators.data.prepare import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    prompts: list[list[int]] = []
    categories: list[str] = []
    seen = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"--data {path} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not JSON ({exc.msg})") from None
            messages = record_messages(record, where)
            category = record_category(record, where)
            seen += 1
            if seen <= skip:
                continue
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            if max_prompt_len is not None and len(ids) > max_prompt_len:
                ids = ids[-max_prompt_len:]
            prompts.append(ids)
            categories.append(category)
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise UserError(f"--data {path}: no prompt (after skipping {skip})")
    return PromptSet(prompts, categories)
