"""A real EAGLE-3 checkpoint with a known, non-trivial acceptance and no training.

`lm_head` is zeroed, so every draft logit ties at 0, and `d2t` maps the draft vocabulary to
the token the verifier emits most often on the given prompts followed by 7 larger ids: the
tie goes to that token whether it is broken by draft index (PyTorch's argmax over the draft
vocabulary) or by target id (vLLM scatters the draft logits into the verifier's vocabulary
before its argmax). The draft always proposes that token, and is accepted exactly where the
verifier writes it. With a verifier whose greedy replies differ by
prompt (`varied_verifier`), acceptance differs by prompt, between none and all.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import torch


def varied_verifier(path: Path, hidden_size: int = 64, num_layers: int = 8) -> Path:
    """The tiny Llama with matrices drawn at std 0.05 (tests/test_real_vllm.py's verifier too): greedy
    text with a repeated token or a short cycle that differs by prompt."""
    from transformers import AutoModelForCausalLM

    from speculators.tiny.builders import build_tiny_verifier

    path = build_tiny_verifier(path, arch="llama", hidden_size=hidden_size, num_layers=num_layers)
    model = AutoModelForCausalLM.from_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.05)
    model.save_pretrained(path)
    return path


def constant_draft(verifier: Path, prompts: Sequence[Sequence[int]], out: Path, k: int = 3,
                   new_tokens: int = 12) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from speculators.models.eagle3 import Eagle3Config, Eagle3DraftModel

    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    emitted: Counter = Counter()
    for ids in prompts:
        generated = model.generate(torch.tensor([list(ids)]), max_new_tokens=new_tokens, do_sample=False)
        emitted.update(generated[0, len(ids):].tolist())
    top = emitted.most_common(1)[0][0]
    vcfg = AutoConfig.from_pretrained(verifier)
    cfg = Eagle3Config.from_verifier_config(vcfg, speculative_tokens=k, draft_vocab_size=8,
                                            verifier_name_or_path=str(verifier))
    torch.manual_seed(0)
    draft = Eagle3DraftModel(cfg)
    targets = torch.arange(top, top + 8)
    if int(targets[-1]) >= vcfg.vocab_size:
        raise ValueError(f"token {top} is too close to the end of the vocabulary for this construction")
    t2d = torch.zeros(vcfg.vocab_size, dtype=torch.bool)
    t2d[targets] = True
    draft.set_vocab_mapping(targets - torch.arange(8), t2d)
    with torch.no_grad():
        draft.lm_head.weight.zero_()
    draft.save_pretrained(out)
    return out
