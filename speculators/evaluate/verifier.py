"""The verifier side of PyTorch speculative decoding: logits plus EAGLE-3 aux states.

Layer ids use vLLM's numbering (`speculators.vllm.layers`): id ``i`` is the input
of decoder layer ``i`` (Hugging Face ``hidden_states[i]``); id ``n`` is the last
layer's output before the final norm.
"""

from __future__ import annotations

from typing import Sequence

import torch


def capture_layers(model, layer_ids: Sequence[int], input_ids: torch.Tensor):
    """Run ``model`` on ``input_ids [1, T]``; return ``(logits [T, V], [states [T, H] per id])``."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = body.layers
    n = len(layers)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i in layer_ids:
        if i < n:
            def pre(mod, args, kwargs, i=i):
                captured[i] = (args[0] if args else kwargs["hidden_states"])[0]

            hooks.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, out, i=i):
                captured[i] = (out[0] if isinstance(out, tuple) else out)[0]

            hooks.append(layers[n - 1].register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits.float(), [captured[i] for i in layer_ids]


class Verifier:
    """A Hugging Face causal LM that returns next-token logits and concatenated aux states.

    ``aux_dtype`` rounds the aux states the way training data stores them (bf16)
    before they reach the draft.
    """

    def __init__(self, model, aux_layer_ids: Sequence[int], aux_dtype: torch.dtype | None = torch.bfloat16):
        self.model = model.eval()
        self.aux_layer_ids = [int(i) for i in aux_layer_ids]
        self.aux_dtype = aux_dtype
        self.forwards = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str, aux_layer_ids: Sequence[int], dtype=torch.float32,
                        device: str | torch.device = "cpu") -> "Verifier":
        from transformers import AutoModelForCausalLM

        from speculators.errors import UserError

        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"--verifier {name_or_path!r}: cannot load the model ({exc})") from exc
        return cls(model.to(device), aux_layer_ids)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def __call__(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [T, V] float32, aux [T, num_aux * H])`` for the token list ``ids``."""
        self.forwards += 1
        device = next(self.model.parameters()).device
        logits, states = capture_layers(self.model, self.aux_layer_ids, torch.tensor([list(ids)], device=device))
        aux = torch.cat(states, dim=-1)
        if self.aux_dtype is not None:
            aux = aux.to(self.aux_dtype)
        return logits, aux
