"""`speculators eval`: acceptance of a draft on held-out prompts, or of a live vLLM server."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from speculators.errors import UserError
from speculators.evaluate.prompt_sets import PromptSet, is_prompt_set, load_prompt_set
from speculators.evaluate.report import (
    SpecDecodeCounts,
    build_report,
    category_figures,
    counts_by_category,
    group_by_category,
)
from speculators.verifier import text_config

logger = logging.getLogger(__name__)


def prompt_before_reply(input_ids: list[int], loss_mask: list[int],
                        max_prompt_len: int | None = None) -> list[int] | None:
    """A row's tokens before its first loss-masked (assistant) token, keeping the last
    ``max_prompt_len``; None when the row has no reply or no prompt before it."""
    if 1 not in loss_mask or loss_mask.index(1) == 0:
        return None
    prompt = list(input_ids[: loss_mask.index(1)])
    if max_prompt_len is not None and len(prompt) > max_prompt_len:
        prompt = prompt[-max_prompt_len:]
    return prompt


def prompts_from_prepared(path: str | Path, indices: Sequence[int] | None = None, limit: int | None = None,
                          max_prompt_len: int | None = None) -> list[list[int]]:
    """Prompts = each row's tokens before its first loss-masked (assistant) token."""
    from datasets import load_from_disk

    path = Path(path)
    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--data {path}: not a prepared dataset from `speculators prepare-data` ({exc})") from exc
    if "input_ids" not in ds.column_names or "loss_mask" not in ds.column_names:
        raise UserError(f"--data {path}: needs input_ids and loss_mask columns")
    ds = ds.with_format(None)  # the public package's layout saves torch-format rows; read lists
    rows = range(len(ds)) if indices is None else indices
    prompts = []
    for i in rows:
        row = ds[int(i)]
        prompt = prompt_before_reply(list(row["input_ids"]), list(row["loss_mask"]), max_prompt_len)
        if prompt is None:
            continue
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"--data {path}: no row has a prompt followed by an assistant turn")
    return prompts


def prompts_from_source(data: str, tokenizer_path: str, skip: int = 0, limit: int | None = None,
                        seed: int = 0, seq_length: int | None = None,
                        max_prompt_len: int | None = None) -> list[list[int]]:
    """Prompts from a conversation source (``sharegpt``, a .jsonl file, a hub id), read in
    prepare-data's order (same ``seed``) and tokenized its way; the first ``skip`` usable
    conversations are skipped, so ``skip`` = prepare-data's ``--max-samples`` holds out
    exactly the conversations training never saw (with the same ``--seq-length``)."""
    from speculators.data.chat import Conversation, encode_conversations, end_of_turn_ids
    from speculators.data.prepare import drop_opening_assistant, load_tokenizer, ordered_records
    from speculators.data.sources import BadConversation, normalize_record, record_tools, resolve_data

    tok = load_tokenizer(tokenizer_path)
    eot = end_of_turn_ids(tok, tokenizer_path)
    records = ordered_records(resolve_data(data), seed)
    kept = 0
    prompts: list[list[int]] = []
    batch: list[Any] = []

    def flush() -> bool:
        nonlocal kept
        convs = []
        for record in batch:
            try:  # as prepare-data's default (per conversation) does
                convs.append(Conversation(drop_opening_assistant(normalize_record(record)), record_tools(record)))
            except BadConversation:
                pass
        for result in encode_conversations(tok, convs, eot, max_tokens=seq_length):
            if isinstance(result, BadConversation) or not any(result[1]):
                continue
            kept += 1
            if kept <= skip:
                continue
            ids, mask = result[0], result[1]
            start = mask.index(1)
            if start == 0:
                continue
            prompt = list(ids[:start])
            prompts.append(prompt[-max_prompt_len:] if max_prompt_len else prompt)
            if limit is not None and len(prompts) >= limit:
                return True
        batch.clear()
        return False

    for record in records:
        batch.append(record)
        if len(batch) == 64 and flush():
            return prompts
    if batch:
        flush()
    if not prompts:
        raise UserError(f"--data {data}: no usable conversation after skipping {skip}")
    return prompts


@dataclass
class EvalSettings:
    num_speculative_tokens: int = 3
    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    draft_cost: float | None = None
    device: str = "auto"  # auto | cpu | cuda[:N]


def eos_ids_of(verifier_path: str) -> list[int]:
    ids: set[int] = set()
    try:
        from transformers import AutoTokenizer, GenerationConfig

        tok = AutoTokenizer.from_pretrained(verifier_path)
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        try:
            gen = GenerationConfig.from_pretrained(verifier_path)
            eos = gen.eos_token_id
            ids.update([eos] if isinstance(eos, int) else list(eos or []))
        except OSError:
            pass
    except OSError:
        logger.warning("no tokenizer at %s; generating without an end-of-sequence stop", verifier_path)
    return sorted(ids)


def evaluate_prompts(verifier, proposer, prompts: Sequence[Sequence[int]], settings: EvalSettings,
                     eos_token_ids: Sequence[int] = (),
                     streams: list[dict[str, Any]] | None = None,
                     per_prompt: list[SpecDecodeCounts] | None = None) -> tuple[SpecDecodeCounts, dict[str, Any]]:
    """Run speculative decoding over every prompt; total counts plus run statistics.

    ``streams``: a list that gets, per prompt, its ids, the generated ids and the tokens
    accepted at each step (`speculators.evaluate.streams`); ``per_prompt``: a list that gets
    each prompt's own counts (per-category figures)."""
    from speculators.evaluate.spec_decode import speculative_generate

    total = SpecDecodeCounts()
    gen = torch.Generator().manual_seed(settings.seed)
    tokens = forwards = 0
    start = time.perf_counter()
    for prompt in prompts:
        res = speculative_generate(verifier, proposer, prompt, settings.max_new_tokens,
                                   settings.num_speculative_tokens, settings.temperature, eos_token_ids, gen)
        c = res.counts
        if per_prompt is not None:
            per_prompt.append(c)
        total.num_drafts += c.num_drafts
        total.num_draft_tokens += c.num_draft_tokens
        total.num_accepted_tokens += c.num_accepted_tokens
        k = max(len(total.accepted_per_pos), len(c.accepted_per_pos))
        total.accepted_per_pos = [
            (total.accepted_per_pos[i] if i < len(total.accepted_per_pos) else 0)
            + (c.accepted_per_pos[i] if i < len(c.accepted_per_pos) else 0)
            for i in range(k)
        ]
        tokens += len(res.tokens)
        forwards += res.verifier_forwards
        if streams is not None:
            streams.append({"prompt_ids": list(prompt), "tokens": list(res.tokens), "accepted": list(res.accepted)})
    stats = {
        "num_prompts": len(prompts),
        "generated_tokens": tokens,
        "verifier_forwards": forwards,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    return total, stats


def is_hidden_state_dir(path: str | Path) -> bool:
    """A datagen output (data_config.json or data_<i>.pt files) rather than a prepared dataset."""
    path = Path(path)
    if not path.is_dir() or (path / "dataset_info.json").exists() or (path / "state.json").exists():
        return False
    return (path / "data_config.json").is_file() or any(path.glob("data_*.pt"))


def prompts_from_samples(path: str | Path, data_format_version: int = 1, indices: Sequence[int] | None = None,
                         limit: int | None = None, max_prompt_len: int | None = None,
                         skip_samples: int = 0) -> list[list[int]]:
    """Prompts from a hidden-state directory (either data format version): each sample's tokens
    before its first loss-masked token, in sample order (``indices``: positions in that order)."""
    from speculators.data.formats import open_sample_store

    store = open_sample_store(path, on_corrupt="raise", data_format_version=data_format_version)
    positions = range(len(store)) if indices is None else indices
    prompts: list[list[int]] = []
    for pos in positions:
        if int(pos) < skip_samples:
            continue
        sample = store.load_stored(int(pos))  # tokens only: fp8 is not dequantised
        prompt = prompt_before_reply(sample["input_ids"].tolist(), sample["loss_mask"].tolist(), max_prompt_len)
        if prompt is None:
            continue
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"--data {path}: no sample has a prompt followed by an assistant turn")
    return prompts


def load_prompts(data: str | Path, tokenizer_path: str, num_prompts: int | None = None,
                 indices: Sequence[int] | None = None, max_prompt_len: int | None = None,
                 skip_samples: int = 0, data_seed: int = 0, seq_length: int | None = None,
                 data_format_version: int = 1) -> list[list[int]]:
    """A prepared dataset directory, a hidden-state directory (datagen output, data format
    version 0 or 1), a prompt set (`speculators.evaluate.prompt_sets`: a .jsonl of prompts with
    categories) or a conversation source tokenized like prepare-data."""
    return load_prompt_set_of(data, tokenizer_path, num_prompts, indices, max_prompt_len, skip_samples,
                              data_seed, seq_length, data_format_version).prompts


def load_prompt_set_of(data: str | Path, tokenizer_path: str, num_prompts: int | None = None,
                       indices: Sequence[int] | None = None, max_prompt_len: int | None = None,
                       skip_samples: int = 0, data_seed: int = 0, seq_length: int | None = None,
                       data_format_version: int = 1) -> PromptSet:
    """`load_prompts` with each prompt's category when ``data`` is a prompt set (else None)."""
    if is_prompt_set(data):
        if indices is not None:
            raise UserError(f"--val-fraction applies to a prepared dataset; {data} is a prompt set")
        return load_prompt_set(data, tokenizer_path, num_prompts, skip_samples, max_prompt_len)
    return PromptSet(_load_prompts(data, tokenizer_path, num_prompts, indices, max_prompt_len, skip_samples,
                                   data_seed, seq_length, data_format_version))


def _load_prompts(data: str | Path, tokenizer_path: str, num_prompts: int | None,
                  indices: Sequence[int] | None, max_prompt_len: int | None, skip_samples: int,
                  data_seed: int, seq_length: int | None, data_format_version: int) -> list[list[int]]:
    if is_hidden_state_dir(data):
        return prompts_from_samples(data, data_format_version, indices, num_prompts, max_prompt_len, skip_samples)
    if data_format_version != 1:
        raise UserError(f"--data-format-version {data_format_version} applies to a hidden-state --data directory; "
                        f"{data} is not one")
    if Path(data).is_dir() and ((Path(data) / "dataset_info.json").exists() or (Path(data) / "state.json").exists()):
        rows = indices
        if skip_samples:
            from datasets import load_from_disk

            rows = [i for i in (indices if indices is not None else range(len(load_from_disk(str(data)))))
                    if i >= skip_samples]
        return prompts_from_prepared(data, rows, num_prompts, max_prompt_len)
    return prompts_from_source(str(data), tokenizer_path, skip_samples, num_prompts, data_seed, seq_length,
                               max_prompt_len)


def evaluate_checkpoint(checkpoint: str | Path, verifier_path: str | None, data: str | Path,
                        settings: EvalSettings, num_prompts: int | None = None,
                        indices: Sequence[int] | None = None, max_prompt_len: int | None = None,
                        skip_samples: int = 0, data_seed: int = 0, seq_length: int | None = None,
                        streams: list[dict[str, Any]] | None = None, data_format_version: int = 1) -> dict[str, Any]:
    """The PyTorch acceptance report of a speculator checkpoint on held-out prompts
    (``streams``: see `evaluate_prompts`)."""
    from speculators.config.device import resolve_device
    from speculators.evaluate.proposers import proposer_from_checkpoint
    from speculators.evaluate.verifier import Verifier
    from speculators.models.eagle3 import default_aux_layer_ids
    from speculators.models.locate import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    device = torch.device(resolve_device(settings.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    proposer = proposer_from_checkpoint(ckpt, device=device, dtype=dtype)
    cfg = proposer.model.config
    verifier_path = verifier_path or cfg.verifier_name_or_path
    if not verifier_path:
        raise UserError(f"{ckpt}/config.json names no verifier; pass --verifier")
    verifier = Verifier.from_pretrained(verifier_path, [], dtype=dtype, device=device)
    n_layers = int(text_config(verifier.model.config).num_hidden_layers)
    verifier.aux_layer_ids = list(cfg.aux_layer_ids or default_aux_layer_ids(n_layers))
    if verifier.vocab_size != cfg.vocab_size:
        raise UserError(f"--verifier {verifier_path}: vocabulary {verifier.vocab_size} != draft's {cfg.vocab_size}")
    prompt_set = load_prompt_set_of(data, verifier_path, num_prompts, indices, max_prompt_len, skip_samples,
                                    data_seed, seq_length, data_format_version)
    torch.manual_seed(settings.seed)
    per_prompt: list[SpecDecodeCounts] = []
    counts, stats = evaluate_prompts(verifier, proposer, prompt_set.prompts, settings, eos_ids_of(verifier_path),
                                     streams, per_prompt)
    if prompt_set.categories is not None:
        by_category = counts_by_category(group_by_category(prompt_set.categories), per_prompt)
        stats["categories"] = category_figures(by_category, settings.num_speculative_tokens)
    return build_report(
        counts, "pytorch", settings.num_speculative_tokens, settings.draft_cost,
        checkpoint=str(ckpt), verifier=str(verifier_path), data=str(data),
        temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
        aux_layer_ids=verifier.aux_layer_ids, device=str(device), dtype=str(dtype).removeprefix("torch."),
        **stats,
    )
