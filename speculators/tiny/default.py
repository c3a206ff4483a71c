"""The embedded default verifier: a small chat LM worth accelerating, built the same everywhere.

Why it exists: the CPU demo, the tests and the dashboard need a verifier without a
model hub. A random or barely trained model answers with a few repeated tokens,
and a draft trained against it measures nothing. This one is trained long enough
that its greedy replies are varied (see `quality_report`), and it runs in vLLM's
CPU attention (head_dim 32).

Determinism:
* the tokenizer and the training stream come from the first ShareGPT records in
  file order; batches are drawn from a seeded generator;
* training runs on one thread in float64 and the saved weights are rounded to the
  bfloat16 grid (stored as float32), so two builds on one machine give the same bytes.
* Across machines a build is NOT byte-stable: with torch's AVX2 kernels
  (``ATEN_CPU_CAPABILITY=avx2``) instead of AVX-512 the 800 training steps amplify
  float64 rounding into other weights, and the demo measured 2.490 instead of 2.898;
  the same bytes under AVX2 gave 2.898 again. So the build of ``DEFAULT_RECIPE`` ships
  in the package (``default_verifier/``, 5 MB) and every machine uses those bytes;
  the recipe builds it (``python -m speculators.tiny.default OUT``) and a changed
  recipe must be rebuilt and shipped again (a test compares the hashes).

Cached under ``$SPECULATORS_CACHE`` (default ``~/.cache/speculators``) by a hash of
the recipe, so other recipes are built once per machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# Bump when the same recipe would produce different bytes.
BUILD_VERSION = 1
CARD = "verifier_card.json"


@dataclass(frozen=True)
class VerifierRecipe:
    """Everything that decides the default verifier's bytes."""

    arch: str = "llama"
    template: str = "llama3"
    vocab_size: int = 512  # subword pieces: short, learnable tokens for a model this small
    tokenizer_records: int = 1500
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4  # head_dim 32: the smallest vLLM's CPU attention takes
    num_kv_heads: int = 2
    intermediate_size: int = 256
    prose_only: bool = True  # plain-prose conversations, whitespace collapsed (see builders.prose_messages)
    # The training stream: steps draw windows of it at random (about 0.8 epochs at 800 steps).
    # 100k tokens seen four times (the first recipe) overfit: held-out perplexity 71.8.
    corpus_tokens: int = 1_000_000
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 800
    # 5e-3 (the first recipe) sat on a plateau (loss 4.8 after 200 steps where 1e-3 or 2e-3
    # reach 4.1) and its greedy replies looped on a few tokens.
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0
    # held-out quality measurement (records after the training stream)
    eval_prompts: int = 16
    eval_new_tokens: int = 64

    def digest(self) -> str:
        payload = json.dumps({"build": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_RECIPE = VerifierRecipe()


def cache_root() -> Path:
    return Path(os.environ.get("SPECULATORS_CACHE") or Path.home() / ".cache" / "speculators")


def dir_hash(path: str | Path) -> str:
    """sha256 over the relative names and bytes of every file (sorted): the build's identity."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    (progress or (lambda s: print(s, flush=True)))(text)


def _lr_at(recipe: VerifierRecipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _round_to_bf16_grid(model) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))


def heldout_conversations(recipe: VerifierRecipe, skip_records: int) -> list[list[dict[str, str]]]:
    """ShareGPT conversations after the ones the training stream used (file order), of the
    training text's kind (prose when the recipe trains on prose)."""
    from speculators.data.sharegpt import iter_sharegpt
    from speculators.tiny.builders import prose_messages, sharegpt_messages

    out = []
    for i, record in enumerate(iter_sharegpt(limit=skip_records + 50 * recipe.eval_prompts)):
        if i < skip_records:
            continue
        messages = sharegpt_messages(record)
        if recipe.prose_only and messages:
            messages = prose_messages(messages)
        if messages and messages[0]["role"] == "user" and any(m["role"] == "assistant" for m in messages):
            out.append(messages)
        if len(out) >= recipe.eval_prompts:
            break
    return out


def quality_report(model, tokenizer, conversations, new_tokens: int) -> dict:
    """Distinct tokens per greedy reply and per-token perplexity on held-out conversations."""
    import torch

    distinct, ppl_nll, ppl_n, samples = [], 0.0, 0, []
    model.eval()
    with torch.no_grad():
        for messages in conversations:
            prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)[-256:]
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            reply = out[0, len(prompt):].tolist()
            distinct.append(len(set(reply)))
            if len(samples) < 3:
                samples.append(tokenizer.decode(reply, skip_special_tokens=True)[:200])
            full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)[:512]
            x = torch.tensor([full])
            loss = model(input_ids=x, labels=x).loss
            ppl_nll += float(loss) * (len(full) - 1)
            ppl_n += len(full) - 1
    return {
        "distinct_tokens_per_reply": round(sum(distinct) / max(1, len(distinct)), 2),
        "reply_tokens": new_tokens,
        "heldout_perplexity": round(math.exp(ppl_nll / max(1, ppl_n)), 2),
        "heldout_conversations": len(conversations),
        "sample_replies": samples,
    }


def build_default_verifier(
    output_dir: str | Path,
    recipe: VerifierRecipe = DEFAULT_RECIPE,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train the default verifier into ``output_dir`` (a new directory) and write its card."""
    import torch
    from transformers import AutoModelForCausalLM

    from speculators.tiny.builders import build_tiny_tokenizer, chat_token_stream, tiny_config

    start = time.time()
    output_dir = Path(output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _say(progress, f"verifier {recipe.digest()}: training a {recipe.vocab_size}-token BPE tokenizer "
                       f"on {recipe.tokenizer_records} ShareGPT records")
        tokenizer = build_tiny_tokenizer(recipe.template, vocab_size=recipe.vocab_size,
                                         corpus_records=recipe.tokenizer_records)
        config = tiny_config(
            vocab_size=len(tokenizer), arch=recipe.arch, hidden_size=recipe.hidden_size,
            num_layers=recipe.num_layers, num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads,
            intermediate_size=recipe.intermediate_size, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        need = recipe.corpus_tokens
        _say(progress, f"verifier: tokenizing {need} training tokens of chat text")
        stream, records_read = chat_token_stream(tokenizer, need, limit=20000, prose=recipe.prose_only)
        rows = len(stream) // recipe.seq_len
        data = torch.tensor(stream[: rows * recipe.seq_len]).view(rows, recipe.seq_len)
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float64)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(recipe.seed)
        model.train()
        last = 0.0
        for step in range(recipe.steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(recipe, step)
            batch = data[torch.randint(0, rows, (recipe.batch_size,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            now = time.time()
            if now - last >= 2.0 or step + 1 == recipe.steps:
                last = now
                done = (step + 1) / recipe.steps
                eta = (now - start) / done * (1 - done)
                _say(progress, f"verifier: step {step + 1}/{recipe.steps} loss {float(loss.detach()):.3f} "
                               f"({done:.0%}, ETA {eta:.0f}s)")
        model = model.to(torch.float32)
        _round_to_bf16_grid(model)
        model.eval()
        _say(progress, f"verifier: measuring greedy replies on {recipe.eval_prompts} held-out prompts")
        conversations = heldout_conversations(recipe, skip_records=records_read)
        report = quality_report(model, tokenizer, conversations, recipe.eval_new_tokens)
    finally:
        torch.set_num_threads(threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    card = {"recipe": asdict(recipe), "recipe_hash": recipe.digest(), "build_version": BUILD_VERSION,
            "quality": report}
    (output_dir / CARD).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    _say(progress, f"verifier: built in {time.time() - start:.0f}s; distinct tokens per "
                   f"{recipe.eval_new_tokens}-token greedy reply {report['distinct_tokens_per_reply']}, "
                   f"held-out perplexity {report['heldout_perplexity']}")
    return output_dir


SHIPPED = Path(__file__).resolve().parent / "default_verifier"


def shipped_build(recipe: VerifierRecipe) -> Path | None:
    """The packaged build of ``recipe``, if the package ships that recipe's bytes and
    ``$SPECULATORS_VERIFIER_FROM_RECIPE`` does not ask to build it on this machine."""
    if os.environ.get("SPECULATORS_VERIFIER_FROM_RECIPE", "") not in ("", "0"):
        return None
    try:
        card = json.loads((SHIPPED / CARD).read_text())
    except (OSError, ValueError):
        return None
    return SHIPPED if card.get("recipe_hash") == recipe.digest() else None


def default_verifier(
    recipe: VerifierRecipe = DEFAULT_RECIPE,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The cached copy of ``recipe``'s verifier: the packaged bytes where the package ships
    that recipe (the same on every machine), else built on first use (concurrent builders
    do not collide)."""
    final = cache_root() / "verifiers" / recipe.digest()
    if (final / CARD).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{recipe.digest()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shipped = shipped_build(recipe)
    try:
        if shipped is not None:  # a copy, so nothing a caller writes reaches the package
            shutil.copytree(shipped, tmp)
            _say(progress, f"verifier {recipe.digest()}: the packaged build ({shipped})")
        else:
            build_default_verifier(tmp, recipe, progress)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep theirs (same bytes)
            if not (final / CARD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def copy_default_verifier(output_dir: str | Path, recipe: VerifierRecipe = DEFAULT_RECIPE,
                          progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the cached verifier and copy it to ``output_dir``."""
    src = default_verifier(recipe, progress)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)
    _say(progress, f"verifier {recipe.digest()} (cached at {src}) copied to {out}")
    return out


if __name__ == "__main__":  # python -m speculators.tiny.default OUT
    build_default_verifier(sys.argv[1])
