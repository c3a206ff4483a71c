"""Draft proposers for `speculative_generate`.

`Eagle3Proposer` adapts the trained EAGLE-3 draft (`speculators.models.eagle3`):
the first drafting forward reads the verifier's aux states at positions ``0..n-1``
paired with the tokens at ``1..n`` (position ids ``1..n``, as in training); each
later step feeds the draft's own pre-norm hidden output and the token it just
drafted at the next position. Draft-vocab ids map to the verifier's with ``d2t``.
"""

from __future__ import annotations

from pathlib import Path

import torch


class Eagle3Proposer:
    """``use_cache``: keep the draft's keys/values for the verifier-fed prefix between
    calls of one generation (drafted entries are truncated off); `reset` starts anew."""

    def __init__(self, model, vocab_size: int, use_cache: bool = True):
        self.model = model.eval()
        self.vocab_size = int(vocab_size)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.use_cache = use_cache
        self.reset()

    def reset(self) -> None:
        self._cache = None
        self._done = 0  # verifier-fed positions held in the cache
        self._ids: list[int] = []

    @classmethod
    def from_checkpoint(cls, directory: str | Path, vocab_size: int | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "Eagle3Proposer":
        from speculators.models.eagle3 import Eagle3DraftModel

        model = Eagle3DraftModel.from_pretrained(directory).to(device=device, dtype=dtype)
        return cls(model, vocab_size or model.config.vocab_size)

    def _pick(self, logits: torch.Tensor, temperature: float, generator):
        """Draft-vocab logits ``[D]`` -> (target token, q over the verifier vocab or None)."""
        if temperature == 0:
            d = int(logits.argmax())
            return d + int(self.model.d2t[d]), None
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        d = int(torch.multinomial(probs, 1, generator=generator))
        q = torch.zeros(self.vocab_size)
        idx = torch.arange(probs.shape[0]) + self.model.d2t.cpu()
        q[idx] = probs
        return d + int(self.model.d2t[d]), q

    def _prefix_forward(self, input_ids, aux_hidden):
        """Draft forward over positions ``0..n-1`` (aux ``h_p`` with token ``p+1`` at position ``p+1``),
        reusing the cached ones."""
        n = int(aux_hidden.shape[0])
        ids = input_ids.tolist()
        start = 0
        if self.use_cache and self._cache is not None and ids[: self._done + 1] == self._ids[: self._done + 1]:
            start = min(self._done, n - 1)
            self._cache.truncate(start)
        cache = self._cache if start > 0 else None
        aux = aux_hidden[start:n][None].to(self.device, self.dtype)
        nxt = input_ids[start + 1 : n + 1][None].to(self.device)
        pos = torch.arange(start + 1, n + 1, device=self.device)[None]
        out = self.model.draft_forward(aux, nxt, pos, cache, fused=False)
        if self.use_cache:
            self._cache, self._done, self._ids = out.cache, n, ids
        return out

    @torch.no_grad()
    def propose(self, input_ids, aux_hidden, k, temperature=0.0, generator=None):
        n = int(aux_hidden.shape[0])
        out = self._prefix_forward(input_ids, aux_hidden)
        tokens, qs = [], []
        for j in range(k):
            tok, q = self._pick(out.logits[0, -1], temperature, generator)
            tokens.append(tok)
            qs.append(q)
            if j + 1 == k:
                break
            p = torch.tensor([[n + 1 + j]], device=self.device)
            t = torch.tensor([[tok]], device=self.device)
            out = self.model.draft_forward(out.hidden_prenorm[:, -1:], t, p, out.cache, fused=True)
        q_all = torch.stack(qs) if temperature > 0 else None
        return torch.tensor(tokens, dtype=torch.long), q_all


class DFlashProposer:
    """Adapts a DFlash draft (`speculators.models.dflash`): one draft forward per step over the
    verifier's aux states at ``0..n-1`` (the context) and the block ``[newest token, mask, ...]``
    at positions ``n..n+k``; slot ``j`` proposes the token at ``n + j`` (as vLLM's DFlashProposer)."""

    def __init__(self, model, vocab_size: int):
        self.model = model.eval()
        self.vocab_size = int(vocab_size)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, directory: str | Path, vocab_size: int | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "DFlashProposer":
        from speculators.models.dflash import DFlashDraftModel

        model = DFlashDraftModel.from_pretrained(directory).to(device=device, dtype=dtype)
        return cls(model, vocab_size or model.config.vocab_size)

    @torch.no_grad()
    def propose(self, input_ids, aux_hidden, k, temperature=0.0, generator=None):
        n = int(aux_hidden.shape[0])
        logits = self.model.propose(aux_hidden[:n].to(self.device, self.dtype), int(input_ids[n]), k)
        d2t = self.model.d2t
        if temperature == 0:
            d = logits.argmax(-1)
            return (d + d2t[d]).cpu().to(torch.long), None
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        d = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        q = torch.zeros(k, self.vocab_size)
        q[:, torch.arange(probs.shape[1]) + d2t.cpu()] = probs
        return (d + d2t.cpu()[d]).to(torch.long), q


def proposer_from_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32):
    """The proposer of the draft saved in ``directory`` (EAGLE-3 or DFlash, by its config.json)."""
    from speculators.models.drafts import algorithm_of

    if algorithm_of(directory) == "dflash":
        return DFlashProposer.from_checkpoint(directory, device=device, dtype=dtype)
    return Eagle3Proposer.from_checkpoint(directory, device=device, dtype=dtype)


def proposer_for(draft):
    """The proposer adapting an in-memory draft model."""
    from speculators.models.dflash import DFlashDraftModel

    if isinstance(draft, DFlashDraftModel):
        return DFlashProposer(draft, draft.config.vocab_size)
    return Eagle3Proposer(draft, draft.config.vocab_size)


class VerifierProposer:
    """Drafts with the verifier itself (greedy or sampled): every greedy draft is accepted.

    A reference point for tests and for checking the acceptance bookkeeping.
    """

    def __init__(self, verifier):
        self.verifier = verifier

    def propose(self, input_ids, aux_hidden, k, temperature=0.0, generator=None):
        seq = input_ids.tolist()
        tokens, qs = [], []
        for _ in range(k):
            logits, _, _ = self.verifier(seq)
            if temperature == 0:
                t = int(logits[-1].argmax())
            else:
                q = torch.softmax(logits[-1] / temperature, dim=-1)
                t = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            tokens.append(t)
            seq.append(t)
        return torch.tensor(tokens), (torch.stack(qs) if qs else None)
