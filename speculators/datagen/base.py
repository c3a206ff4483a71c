"""The hidden-state generator interface every datagen backend implements.

Layer-id convention (same as vLLM's ``eagle_aux_hidden_state_layer_ids``)
-------------------------------------------------------------------------
For a verifier with ``n = num_hidden_layers`` decoder layers:

* id ``i`` with ``0 <= i < n`` is the residual stream **entering** decoder layer
  ``i`` (id 0 is the embedding output). That is transformers'
  ``output_hidden_states[i]`` and what vLLM collects as aux hidden state ``i``.
* id ``n`` is the residual stream **leaving** the last decoder layer, *before*
  the final norm. (transformers 5.x returns the post-norm tensor as
  ``hidden_states[n]``, so backends must capture the norm's input instead.) The
  trainer applies the verifier's final norm and ``lm_head`` to it.

The stored list always ends with id ``n``; the ids before it feed the draft's ``fc``.

Writing a backend
-----------------
Subclass `HiddenStateGenerator`, implement `generate`, and expose a module-level
``create(spec: GeneratorSpec) -> HiddenStateGenerator``. Register the module in
`BACKENDS`. The runner (`speculators.datagen.runner`) does everything else:
resume, atomic writes, ``data_config.json``, the safetensors layout.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from speculators.errors import UserError

# backend name -> module exposing `create(spec)`
BACKENDS = {
    "transformers": "speculators.datagen.transformers_backend",
    "vllm": "speculators.datagen.vllm_backend",
}


@dataclass
class GeneratorSpec:
    """Everything a backend needs to start; unknown-to-a-backend fields are ignored by it."""

    model_path: str
    layer_ids: list[int]
    device: str = "auto"  # transformers: cpu | cuda | cuda:N | auto
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    extra_args: list[str] = field(default_factory=list)  # passed through to the backend (vLLM args)


class HiddenStateGenerator(ABC):
    """Runs the verifier on token ids and returns the chosen layers' hidden states."""

    #: resolved layer ids, last one == num_hidden_layers
    layer_ids: list[int]
    hidden_size: int
    num_hidden_layers: int

    @abstractmethod
    def generate(self, batch: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        """For each sample in ``batch`` (a list of token ids, length L_i) return a list
        of ``len(layer_ids)`` CPU tensors of shape ``[L_i, hidden_size]``, in
        ``layer_ids`` order (any float dtype; the runner stores bf16)."""

    def describe(self) -> dict[str, Any]:
        """Backend details recorded in data_config.json."""
        return {}

    def close(self) -> None:
        """Release the model / engine."""


def create_generator(backend: str, spec: GeneratorSpec) -> HiddenStateGenerator:
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {sorted(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[backend])
    except ModuleNotFoundError as exc:
        raise UserError(
            f"--backend {backend}: not available ({exc.name} is not installed"
            + ("; install vLLM on a CUDA host: pip install 'speculators[datagen]')" if backend == "vllm" else ")")
        ) from None
    return module.create(spec)
