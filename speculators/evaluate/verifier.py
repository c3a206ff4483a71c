"""The verifier side of PyTorch speculative decoding: logits plus EAGLE-3 aux states.

Layer ids use vLLM's numbering (`speculators.verifier`): id ``i`` is the input
of decoder layer ``i`` (Hugging Face ``hidden_states[i]``); id ``n`` is the last
layer's output before the final norm.

`Verifier` keeps a KV cache of the last sequence it saw: a call with a sequence
that shares a prefix with it crops the cache to that prefix and runs only the new
tokens (rejected draft tokens fall off the cache), so evaluation costs about one
pass over the generated text instead of one full prefix per step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from speculators.verifier import capture_hidden_states


def capture_layers(model, layer_ids: Sequence[int], input_ids: torch.Tensor, **forward_kwargs):
    """Run ``model`` on ``input_ids [1, T]``; return ``(logits [T, V], [states [T, H] per id])``."""
    with capture_hidden_states(model, layer_ids) as capture, torch.no_grad():
        logits = model(input_ids=input_ids, **forward_kwargs).logits[0]
    return logits.float(), [h[0] for h in capture.ordered()]


class Verifier:
    """A Hugging Face causal LM returning next-token logits and concatenated aux states.

    ``aux_dtype`` rounds the aux states the way training data stores them (bf16)
    before they reach the draft. ``use_cache=False`` recomputes every call from scratch.
    """

    def __init__(self, model, aux_layer_ids: Sequence[int], aux_dtype: torch.dtype | None = torch.bfloat16,
                 use_cache: bool = True):
        self.model = model.eval()
        self.aux_layer_ids = [int(i) for i in aux_layer_ids]
        self.aux_dtype = aux_dtype
        self.use_cache = use_cache
        self.forwards = 0
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []
        self._cache = None
        self._aux: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, aux_layer_ids: Sequence[int], dtype=torch.float32,
                        device: str | torch.device = "cpu", use_cache: bool = True) -> "Verifier":
        from transformers import AutoModelForCausalLM

        from speculators.errors import UserError

        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"--verifier {name_or_path!r}: cannot load the model ({exc})") from exc
        return cls(model.to(device), aux_layer_ids, use_cache=use_cache)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _aux_of(self, states: list[torch.Tensor]) -> torch.Tensor:
        aux = torch.cat(states, dim=-1)
        return aux.to(self.aux_dtype) if self.aux_dtype is not None else aux

    def __call__(self, ids: Sequence[int], need_logits_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(logits [T - start, V] float32, aux [T, num_aux * H], start)`` for the token list ``ids``.

        ``logits[j]`` predicts the token after position ``start + j``; positions before
        ``start`` were served from the cache. ``start <= need_logits_from`` when given
        (default: only the last position's logits are guaranteed).
        """
        ids = [int(t) for t in ids]
        self.forwards += 1
        device = next(self.model.parameters()).device
        if not self.use_cache:
            logits, states = capture_layers(self.model, self.aux_layer_ids, torch.tensor([ids], device=device))
            return logits, self._aux_of(states), 0
        from transformers import DynamicCache

        start = 0
        for a, b in zip(ids, self._ids):
            if a != b:
                break
            start += 1
        start = min(start, len(ids) - 1)  # always run at least the last token (its logits)
        if need_logits_from is not None:
            start = min(start, need_logits_from)
        if self._cache is None or start == 0:
            self._cache, self._aux, start = DynamicCache(config=self.model.config), None, 0
            # Sliding-window layers (gpt-oss, Mistral) drop old states unless told to keep
            # them until `crop`; rejected draft tokens must be croppable.
            getattr(self._cache, "activate_past_recording", lambda: None)()
        else:
            remove = self._cache.get_seq_length() - start
            if remove > 0:
                self._cache.crop(-remove)  # negative = tokens to drop (transformers 4.x and 5.x)
            self._aux = self._aux[:start]
        new = torch.tensor([ids[start:]], device=device)
        positions = torch.arange(start, len(ids), device=device)[None]
        logits, states = capture_layers(self.model, self.aux_layer_ids, new, past_key_values=self._cache,
                                        position_ids=positions, use_cache=True)
        aux_new = self._aux_of(states)
        self._aux = aux_new if self._aux is None else torch.cat([self._aux, aux_new], dim=0)
        self._ids = ids
        return logits, self._aux, start
