"""In-process `transformers` backend: runs on CPU or one GPU, no server needed.

Hidden states are captured by `speculators.verifier.capture_hidden_states` rather
than ``output_hidden_states``: only the requested layers are kept in memory and id
``n`` is the final norm's input (pre-norm). The base model is called without ``lm_head``, so no logits
are computed. See `speculators.datagen.base` for the convention.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from speculators.config.device import resolve_device
from speculators.datagen.base import GeneratorSpec, HiddenStateGenerator
from speculators.errors import UserError
from speculators.verifier import capture_hidden_states, decoder_parts, text_config

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    return torch.device(resolve_device(device))


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class TransformersGenerator(HiddenStateGenerator):
    def __init__(self, model, layer_ids: list[int], device: torch.device):
        self.model = model
        self.device = device
        self.base, self.layers, self.norm = decoder_parts(model)
        config = text_config(model.config)
        self.num_hidden_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        if len(self.layers) != self.num_hidden_layers:
            raise UserError(
                f"model has {len(self.layers)} decoder layers but config says {self.num_hidden_layers}"
            )
        self.layer_ids = list(layer_ids)
        self.pad_id = int(config.pad_token_id) if getattr(config, "pad_token_id", None) is not None else 0

    @classmethod
    def from_spec(cls, spec: GeneratorSpec) -> "TransformersGenerator":
        from transformers import AutoModelForCausalLM

        if spec.tensor_parallel_size != 1:
            raise UserError("--tensor-parallel-size applies to --backend vllm only")
        device = pick_device(spec.device)
        dtype = pick_dtype(spec.dtype, device)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype)
        except Exception as exc:
            raise UserError(
                f"--target-model-path {spec.model_path}: cannot load the model "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        model.to(device).eval()
        return cls(model, spec.layer_ids, device)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "transformers",
            "device": str(self.device),
            "compute_dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }

    @torch.inference_mode()
    def generate(self, batch: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
        if not batch:
            return []
        lengths = [len(x) for x in batch]
        T = max(lengths)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        for b, x in enumerate(batch):
            ids[b, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
            attn[b, : len(x)] = 1
        with capture_hidden_states(self.model, self.layer_ids) as capture:
            self.base(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                use_cache=False,
            )
        out: list[list[torch.Tensor]] = []
        per_layer = [h.to("cpu") for h in capture.ordered()]
        for b, L in enumerate(lengths):
            out.append([h[b, :L].clone() for h in per_layer])
        return out

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def create(spec: GeneratorSpec) -> TransformersGenerator:
    return TransformersGenerator.from_spec(spec)
