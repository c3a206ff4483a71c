"""Tiny verifiers and tokenizers built locally (no hub): the building blocks.

No model hub is reachable at run time, so everything a test or the demo needs
is made here: a byte-level BPE tokenizer trained on a few hundred ShareGPT
conversations with a real chat template (Llama-3 style or ChatML/Qwen style),
and a random-weight Llama or Qwen3 causal LM of a few hundred thousand
parameters. `pretrain_steps > 0` briefly trains the verifier on chat text so
its next-token distribution is peaked like a real model's; a draft then has
something learnable to imitate.

    tok = build_tiny_tokenizer("llama3")
    path = build_tiny_verifier(tmp / "verifier", arch="qwen3", template="chatml")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

Template = Literal["llama3", "chatml"]
Arch = Literal["llama", "qwen3"]

# Special tokens of both template families live in every tiny tokenizer, so a
# test can switch templates without retraining the vocabulary.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<pad>",
]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_TEMPLATE_TOKENS = {
    # template: (chat_template, bos, eos, pad)
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "<pad>"),
    "chatml": (CHATML_TEMPLATE, None, "<|im_end|>", "<|endoftext|>"),
}


def _corpus(num_records: int) -> list[str]:
    from speculators.data.sharegpt import iter_sharegpt

    texts = []
    for record in iter_sharegpt(limit=num_records):
        for turn in record.get("conversations", []):
            value = turn.get("value")
            if isinstance(value, str) and value:
                texts.append(value)
    return texts


def build_tiny_tokenizer(
    template: Template = "llama3",
    vocab_size: int = 512,
    corpus_records: int = 400,
):
    """A fast byte-level BPE tokenizer with a chat template, trained on ShareGPT text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template not in _TEMPLATE_TOKENS:
        raise ValueError(f"template must be one of {sorted(_TEMPLATE_TOKENS)}, got {template!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(corpus_records), trainer=trainer)

    chat_template, bos, eos, pad = _TEMPLATE_TOKENS[template]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    return fast


def tiny_config(
    vocab_size: int,
    arch: Arch = "llama",
    hidden_size: int = 64,
    num_layers: int = 8,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """A Llama or Qwen3 config small enough for CPU tests (GQA, RoPE, untied head)."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden_size // num_heads, **common)
    raise ValueError(f"arch must be 'llama' or 'qwen3', got {arch!r}")


_CODE_MARKS = ("```", "{", "}", ";", "<", ">", "|", "\\", "=", "#", "*", "_", "[", "]")


def prose_messages(messages: list[dict[str, str]], max_chars: int = 1200) -> list[dict[str, str]] | None:
    """English prose only, whitespace collapsed and cut to ``max_chars`` per turn (None if not prose).

    A small model trained on code and markdown learns that a newline follows
    anything and answers with newlines; on plain prose it learns sentences."""
    out = []
    for m in messages:
        text = " ".join(m["content"].split())
        if not text or any(c in text for c in _CODE_MARKS):
            return None
        if sum(1 for ch in text if ord(ch) > 127) > 0.01 * len(text):
            return None
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0]
        out.append({"role": m["role"], "content": text})
    while out and out[-1]["role"] != "assistant":
        out.pop()
    return out if len(out) >= 2 and out[0]["role"] == "user" else None


def chat_token_stream(tokenizer, need: int, limit: int = 4000, prose: bool = False) -> tuple[list[int], int]:
    """The first ShareGPT conversations (file order) rendered with the chat template and
    concatenated, plus how many records were read. ``prose``: only `prose_messages`."""
    from speculators.data.sharegpt import iter_sharegpt

    stream: list[int] = []
    read = 0
    for record in iter_sharegpt(limit=limit):
        read += 1
        messages = sharegpt_messages(record)
        if prose and messages:
            messages = prose_messages(messages)
        if not messages:
            continue
        stream.extend(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        if len(stream) >= need:
            break
    return stream, read


def sharegpt_messages(record) -> list[dict[str, str]]:
    """Role/content messages of a raw ShareGPT record (human/gpt turns with text only)."""
    turns = record.get("conversations") or []
    return [
        {"role": "user" if t.get("from") == "human" else "assistant", "content": t.get("value", "")}
        for t in turns
        if t.get("from") in ("human", "gpt") and t.get("value")
    ]


def _pretrain(model, tokenizer, steps: int, seq_len: int = 96, batch_size: int = 8, seed: int = 0):
    """Teach the tiny LM a little chat text so its outputs are not near-uniform."""
    import torch

    stream, _ = chat_token_stream(tokenizer, steps * batch_size * seq_len)
    data = torch.tensor(stream[: (len(stream) // seq_len) * seq_len]).view(-1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        lr = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        batch = data[idx]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(out.loss.detach())


def build_tiny_verifier(
    output_dir: str | Path,
    arch: Arch = "llama",
    template: Template | None = None,
    hidden_size: int = 64,
    num_layers: int = 8,
    vocab_size: int = 512,
    seed: int = 0,
    pretrain_steps: int = 0,
) -> Path:
    """Save a tiny causal LM plus its tokenizer to `output_dir` and return the path.

    The default template follows the architecture: Llama-3 style for `llama`,
    ChatML for `qwen3`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    template = template or ("llama3" if arch == "llama" else "chatml")
    output_dir = Path(output_dir)
    tokenizer = build_tiny_tokenizer(template, vocab_size=vocab_size)
    config = tiny_config(
        vocab_size=len(tokenizer),
        arch=arch,
        hidden_size=hidden_size,
        num_layers=num_layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    if pretrain_steps > 0:
        _pretrain(model, tokenizer, pretrain_steps, seed=seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
