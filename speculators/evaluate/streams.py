"""Per-prompt token streams of an eval, and where two evals of the same prompts part.

`speculators eval --output-streams FILE` writes one JSON line per prompt:
``{"prompt": i, "prompt_ids": [...], "tokens": [...]}`` plus, from the PyTorch eval,
``"accepted"`` (draft tokens accepted at each verification step). Greedy speculative
decoding emits the verifier's greedy tokens, so the PyTorch eval and a vLLM server of the
same checkpoint must produce the same streams from the same prompt ids; where they do not,
the acceptance figures measure different text and cannot be compared.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from speculators.atomic import atomic_write_text
from speculators.errors import UserError


def write_streams(path: str | os.PathLike, streams: Sequence[dict[str, Any]]) -> None:
    lines = [json.dumps({"prompt": i, **s}) for i, s in enumerate(streams)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_streams(path: str | os.PathLike) -> list[dict[str, Any]]:
    try:
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read token streams from {path} ({exc}); rerun eval with --output-streams") from exc


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_streams(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How many prompts have equal prompt ids and equal generated ids in ``a`` and ``b``
    (paired in order), and the first prompt whose generated ids differ."""
    if len(a) != len(b):
        raise UserError(f"the two evals saw {len(a)} and {len(b)} prompts; compare evals of the same prompts")
    prompts_equal = tokens_equal = 0
    first: dict[str, Any] | None = None
    for i, (x, y) in enumerate(zip(a, b)):
        prompts_equal += list(x["prompt_ids"]) == list(y["prompt_ids"])
        tx, ty = list(x["tokens"] or []), list(y["tokens"] or [])
        pos = _first_difference(tx, ty)
        if pos is None:
            tokens_equal += 1
        elif first is None:
            first = {"prompt": i, "position": pos, "a": tx[pos:pos + 4], "b": ty[pos:pos + 4]}
    return {"prompts": len(a), "prompt_ids_equal": prompts_equal, "tokens_equal": tokens_equal,
            "first_difference": first}
