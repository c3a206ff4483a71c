"""Verifier conventions in one place: reading its config, its few weights, its hidden states.

Every stage that looks at the verifier (datagen, train, eval, vLLM launch) goes through
this module, so a multimodal or MoE verifier (whose decoder settings sit in a nested
`text_config`) is read the same way everywhere.

Hidden-state ids (the layer-id rules themselves live in `speculators.layers`): for a
verifier with `n` decoder layers, id `i < n` is the residual stream entering decoder layer
`i` (transformers' `hidden_states[i]`, vLLM's aux hidden state `i`); id `n` is the stream
leaving the last layer, before the final norm.  `capture_hidden_states` captures them
with forward pre-hooks, keeping only the ids asked for.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speculators.errors import UserError

# ------------------------------------------------------------------ config
def text_config(config: Any) -> Any:
    """The decoder part of a loaded config: `text_config` of multimodal/MoE wrappers, else itself."""
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        text = getter()
        if text is not None:
            return text
    return getattr(config, "text_config", None) or config


def read_verifier_config(name_or_path: str, flag: str = "--verifier-name-or-path", trust_remote_code: bool = False) -> Any:
    """Load a verifier's config and return its text (decoder) config.

    `flag` names the option the path came from, for the error message.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, KeyError (unknown model_type), ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"{flag} {name_or_path!r}: cannot load its config.json ({first}); "
            "pass a local model directory or a reachable Hugging Face id"
        ) from None
    return text_config(config)


def config_int(text: Any, key: str, name_or_path: str, flag: str = "--verifier-name-or-path") -> int:
    """An integer field of a text config (num_hidden_layers, hidden_size, vocab_size) or a clear error."""
    value = getattr(text, key, None)
    if value is None:
        raise UserError(f"{flag} {name_or_path!r}: its config has no {key}; is this a causal LM?")
    return int(value)


# ------------------------------------------------------------------ weights
_EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "embed_tokens.weight")
_NORM_NAMES = ("model.norm.weight", "model.language_model.norm.weight", "norm.weight")
_LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")


def _resolve_dir(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # offline, unknown repo, ...
        raise UserError(f"--verifier-name-or-path {name_or_path!r}: no local directory and download failed ({exc})") from exc


def _weight_index(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        mapping = json.loads(index.read_text())["weight_map"]
        return {name: directory / fname for name, fname in mapping.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"{directory}: no model.safetensors(.index.json); the verifier must be saved as safetensors")


def _read(index: dict[str, Path], candidates: tuple[str, ...]) -> torch.Tensor | None:
    from safetensors import safe_open

    for name in candidates:
        if name in index:
            with safe_open(str(index[name]), framework="pt") as f:
                return f.get_tensor(name)
    return None


def load_verifier_weights(name_or_path: str, config: Any) -> dict[str, torch.Tensor]:
    """`embed`, `norm`, `lm_head` tensors (float32), read straight from the safetensors shards.

    The draft copies the embedding and training needs only the final norm and lm_head, so
    the whole verifier is never loaded.  lm_head falls back to tied embeddings.
    """
    directory = _resolve_dir(name_or_path)
    index = _weight_index(directory)
    embed = _read(index, _EMBED_NAMES)
    norm = _read(index, _NORM_NAMES)
    lm_head = _read(index, _LM_HEAD_NAMES)
    if lm_head is None and getattr(config, "tie_word_embeddings", False):
        lm_head = embed
    missing = [n for n, t in (("embed_tokens", embed), ("final norm", norm), ("lm_head", lm_head)) if t is None]
    if missing:
        raise UserError(f"{directory}: verifier weights lack {', '.join(missing)}; is this a causal LM checkpoint?")
    return {"embed": embed.float(), "norm": norm.float(), "lm_head": lm_head.float()}


# ------------------------------------------------------------------ hidden states
def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Sequence[torch.nn.Module], torch.nn.Module]:
    """(decoder body, its layers, its final norm) of a transformers causal LM, or a clear error."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    norm = getattr(body, "norm", None)
    if layers is None or norm is None:
        raise UserError(
            f"{type(model).__name__}: cannot find decoder layers and final norm "
            "(expected model.model.layers and model.model.norm as in Llama/Qwen/Mistral)"
        )
    return body, layers, norm


@dataclass
class Capture:
    """Hidden states caught during one forward, keyed by layer id."""

    layer_ids: list[int]
    states: dict[int, torch.Tensor]

    def ordered(self) -> list[torch.Tensor]:
        missing = [i for i in self.layer_ids if i not in self.states]
        if missing:
            raise RuntimeError(f"no hidden state captured for layer ids {missing}; was the model run inside the capture?")
        return [self.states[i] for i in self.layer_ids]


@contextlib.contextmanager
def capture_hidden_states(model: torch.nn.Module, layer_ids: Sequence[int]) -> Iterator[Capture]:
    """Within the block, forwards of `model` (or its decoder body) record the given ids.

    Id `i < n` is decoder layer `i`'s input, id `n` the final norm's input.  A later
    forward overwrites the previous one's states.
    """
    _, layers, norm = decoder_parts(model)
    n = len(layers)
    ids = [int(i) for i in layer_ids]
    bad = [i for i in ids if not 0 <= i <= n]
    if bad:
        raise UserError(f"layer ids {bad} outside the verifier's 0..{n}")
    capture = Capture(ids, {})

    def grab(layer_id: int):
        def hook(module, args, kwargs):
            capture.states[layer_id] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    handles = [
        (norm if i == n else layers[i]).register_forward_pre_hook(grab(i), with_kwargs=True) for i in dict.fromkeys(ids)
    ]
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()
