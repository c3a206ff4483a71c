"""Identical starting weights for both trainers in the side-by-side benchmark.

Each tensor is drawn from a generator seeded by (seed, its canonical name), so our
model and the public package's model start from the same numbers without shipping a
weights file (a Llama-3.1-8B-shaped embedding alone is 2 GB in fp32). Canonical names
are the EAGLE-3 checkpoint names vLLM loads (`fc.weight`, `layers.0.self_attn.q_proj.weight`,
`norm.weight`, `lm_head.weight`, `embed_tokens.weight`, ...); `verifier_lm_head.weight`
gets the same values as `lm_head.weight` (the public trainer copies the verifier head
into the draft head).

Pure torch; never imports `speculators`.
"""

from __future__ import annotations

import zlib

import torch

_STD = 0.02


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def init_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The fp32 starting value of parameter `name` (canonical name) with `shape`."""
    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if name == "verifier_lm_head.weight":
        name = "lm_head.weight"
    g = _generator(seed, name)
    if name == "embed_tokens.weight":
        return torch.randn(shape, generator=g)
    if name == "lm_head.weight":
        # Logit std ~4 on unit-RMS inputs: peaked distributions, like a trained verifier.
        return torch.randn(shape, generator=g) * (4.0 / shape[-1] ** 0.5)
    return torch.randn(shape, generator=g) * _STD


def vocab_mapping(target_vocab: int, draft_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d2t, t2d)` mapping the draft vocab to the first `draft_vocab` target ids.

    The synthetic data draws tokens Zipf-distributed over ids 0.., so the lowest ids
    are the most frequent, which is what a frequency-built mapping would pick.
    """
    d2t = torch.zeros(draft_vocab, dtype=torch.long)
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[:draft_vocab] = True
    return d2t, t2d


@torch.no_grad()
def apply_shared_init(module: torch.nn.Module, seed: int = 0, rename=None) -> dict[str, int]:
    """Overwrite every parameter/buffer of `module` with `init_tensor` values.

    `rename(module_name) -> canonical name or None` maps the module's own state-dict
    names to canonical ones (None skips the entry). Returns counts for logging.
    """
    done = skipped = 0
    for name, tensor in list(module.state_dict(keep_vars=True).items()):
        canon = rename(name) if rename else name
        if canon is None or canon in ("d2t", "t2d") or not tensor.is_floating_point():
            skipped += 1
            continue
        value = init_tensor(canon, tuple(tensor.shape), seed)
        tensor.data.copy_(value.to(tensor.dtype))
        done += 1
    return {"initialised": done, "skipped": skipped}
