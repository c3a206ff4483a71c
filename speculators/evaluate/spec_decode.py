"""Speculative decoding in PyTorch, exact with respect to the verifier.

Each step the draft proposes ``k`` tokens from the verifier's aux hidden states;
one verifier forward scores them all. Greedy (temperature 0): the longest prefix
that matches the verifier's argmax is accepted, then the verifier's own token is
appended, so the output equals plain greedy decoding. Sampling (temperature > 0):
the standard rejection rule (accept with ``min(1, p/q)``, resample a rejection
from ``norm(max(0, p - q))``, bonus token from ``p``) keeps the output distributed
exactly as the verifier's.

A verifier call returns ``(logits from position start on, aux states of every
position, start)``; `speculators.evaluate.verifier.Verifier` serves the accepted
prefix from its KV cache and crops rejected draft tokens off it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from speculators.evaluate.report import SpecDecodeCounts


class DraftProposer(Protocol):
    """Anything that drafts ``k`` tokens given the verifier's view of the prefix."""

    def propose(
        self,
        input_ids: torch.Tensor,
        aux_hidden: torch.Tensor,
        k: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft after ``input_ids [n+1]`` (the last token is the verifier's newest).

        ``aux_hidden [n, A]``: the verifier's aux states at positions ``0..n-1``.
        Returns ``(tokens [k] in the verifier vocabulary, q [k, V] or None)``; ``q``
        (the draft's distribution over the verifier vocabulary at each step) is
        required when ``temperature > 0``.
        """
        ...


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def greedy_accept(draft: Sequence[int], verifier_argmax: Sequence[int]) -> int:
    """Length of the prefix of ``draft`` equal to the verifier's argmax tokens."""
    n = 0
    for d, v in zip(draft, verifier_argmax):
        if int(d) != int(v):
            break
        n += 1
    return n


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """The standard speculative-sampling rule.

    ``p [k+1, V]`` verifier probabilities at the k draft positions plus the bonus one,
    ``q [k, V]`` draft probabilities, ``draft [k]`` the drafted tokens. Returns
    ``(accepted, next_token)``: ``draft[:accepted]`` are kept and ``next_token``
    follows them (a resample from the residual, or the bonus token).
    """
    k = int(draft.shape[0])
    for j in range(k):
        t = int(draft[j])
        pj, qj = float(p[j, t]), float(q[j, t])
        u = float(torch.rand((), generator=generator))
        if qj > 0 and u < min(1.0, pj / qj):
            continue
        residual = torch.clamp(p[j] - q[j], min=0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[j]
        return j, int(torch.multinomial(dist, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


@dataclass
class GenerationResult:
    tokens: list[int]
    counts: SpecDecodeCounts = field(default_factory=SpecDecodeCounts)
    verifier_forwards: int = 0
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted at each verification step


def _stop_index(tokens: list[int], eos: set[int], max_new: int) -> int | None:
    for i, t in enumerate(tokens[:max_new]):
        if t in eos:
            return i + 1
    return max_new if len(tokens) >= max_new else None


def speculative_generate(
    verifier,
    proposer: DraftProposer,
    prompt: Sequence[int],
    max_new_tokens: int,
    k: int,
    temperature: float = 0.0,
    eos_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` with draft ``k`` tokens per step."""
    if k < 1:
        raise ValueError("k must be >= 1")
    eos = {int(t) for t in eos_token_ids}
    result = GenerationResult(tokens=[])
    for stateful in (verifier, proposer):
        if hasattr(stateful, "reset"):
            stateful.reset()
    logits, aux, _ = verifier(list(prompt))
    result.verifier_forwards += 1
    last = logits[-1].float().cpu()
    first = (
        int(last.argmax())
        if temperature == 0
        else int(torch.multinomial(_probs(last, temperature), 1, generator=generator))
    )
    new = [first]
    while _stop_index(new, eos, max_new_tokens) is None:
        seq = list(prompt) + new  # aux covers seq[:-1]
        n = len(seq) - 1
        draft, q = proposer.propose(
            torch.tensor(seq, dtype=torch.long), aux[:n], k, temperature=temperature, generator=generator
        )
        draft = draft.to(torch.long).cpu()
        logits, aux_full, start = verifier(seq + draft.tolist(), need_logits_from=n)
        result.verifier_forwards += 1
        if start > n:
            raise RuntimeError(f"verifier skipped position {n} (served {start} positions from its cache)")
        scores = logits[n - start : n - start + k + 1].float().cpu()  # predicts positions n+1 .. n+k+1
        if temperature == 0:
            accepted = greedy_accept(draft.tolist(), scores[:k].argmax(-1).tolist())
            nxt = int(scores[accepted].argmax())
        else:
            if q is None:
                raise ValueError("the proposer must return draft probabilities for temperature > 0")
            accepted, nxt = rejection_sample(_probs(scores, temperature), q.float().cpu(), draft, generator)
        result.counts.observe(k, accepted)
        result.accepted.append(accepted)
        new += draft[:accepted].tolist() + [nxt]
        aux = aux_full[: n + accepted + 1]
    stop = _stop_index(new, eos, max_new_tokens)
    result.tokens = new[:stop]
    return result


def greedy_generate(verifier, prompt: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Plain greedy decoding with the same verifier forward: the reference for exactness."""
    eos = {int(t) for t in eos_token_ids}
    out: list[int] = []
    if hasattr(verifier, "reset"):
        verifier.reset()
    while len(out) < max_new_tokens:
        logits, _, _ = verifier(list(prompt) + out)
        t = int(logits[-1].argmax())
        out.append(t)
        if t in eos:
            break
    return out
