"""On-policy data from the verifier itself: chat prompts + its own greedy replies.

A draft is judged by how often it agrees with the verifier, so the fairest small
test bed is text the verifier wrote. This builds a prepared dataset (``input_ids``,
``loss_mask`` on the reply) from ShareGPT user turns rendered with the verifier's
chat template, replies generated greedily in one left-padded batch.
"""

from __future__ import annotations

from pathlib import Path

import torch


def self_distilled_rows(verifier_path: str | Path, num_rows: int, max_prompt_len: int = 48,
                        max_new_tokens: int = 48, skip: int = 0, batch_size: int = 32) -> list[tuple[list[int], list[int]]]:
    """``num_rows`` pairs ``(prompt ids, greedy reply ids)``, skipping the first ``skip`` usable prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speculators.data.sharegpt import iter_sharegpt

    tok = AutoTokenizer.from_pretrained(str(verifier_path))
    model = AutoModelForCausalLM.from_pretrained(str(verifier_path), dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    prompts: list[list[int]] = []
    seen = 0
    for rec in iter_sharegpt(limit=20 * (num_rows + skip) + 100):
        turns = rec.get("conversations") or []
        if not turns or turns[0].get("from") != "human" or not turns[0].get("value"):
            continue
        seen += 1
        if seen <= skip:
            continue
        ids = tok.apply_chat_template([{"role": "user", "content": turns[0]["value"][:400]}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        prompts.append(list(ids)[-max_prompt_len:])
        if len(prompts) >= num_rows:
            break
    rows = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b : b + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for i, p in enumerate(chunk):
            rows.append((p, out[i, width:].tolist()))
    return rows


def save_prepared(rows: list[tuple[list[int], list[int]]], out_dir: str | Path) -> Path:
    """Write ``(prompt, reply)`` pairs as a prepared dataset (loss on the reply)."""
    from datasets import Dataset

    out = Path(out_dir)
    Dataset.from_dict({
        "input_ids": [p + r for p, r in rows],
        "loss_mask": [[0] * len(p) + [1] * len(r) for p, r in rows],
    }).save_to_disk(str(out))
    return out
