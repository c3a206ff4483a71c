"""Small chat datasets the tests write to disk (test support, imported by the test files)."""

from __future__ import annotations

import json
from pathlib import Path


def write_qa_chats(path: Path, chats: list[list[tuple[str, str]]]) -> Path:
    """`chats` as a `{"messages": [...]}` .jsonl file: each (question, answer) pair becomes a
    user turn and an assistant turn."""
    lines = []
    for chat in chats:
        msgs = []
        for q, a in chat:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n")
    return path
