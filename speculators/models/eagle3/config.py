"""EAGLE-3 draft configuration and its `config.json` form.

The on-disk form is the speculators eagle3 format that vLLM's speculators config
loader reads (`speculators_model_type`, `transformer_layer_config`, `speculators_config`,
plus the eagle3 top-level fields).  The draft layers are Llama- or Qwen3-style
(`draft_arch`, written as `transformer_layer_config.model_type`); the shape (heads,
head_dim, intermediate size, RoPE with its scaling) comes from the verifier.

Loading is strict: every key is either implemented (read into a field and written back
unchanged), known to have no effect on the draft's forward (metadata), or refused with
a `UserError` naming it -- a draft is never silently evaluated as a different model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from speculators import __version__
from speculators.errors import UserError
from speculators.layers import check_layer_ids, vllm_default_aux_layer_ids
from speculators.models.eagle3.config_keys import check_known_keys, sliding_layer_types
from speculators.models.layer_config import transformer_layer_dict, verifier_layer_shape
from speculators.verifier import text_config

# Draft layer styles and the architecture name written for each.
DRAFT_ARCHS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def default_aux_layer_ids(num_hidden_layers: int) -> list[int]:
    """The aux layers vLLM assumes when config.json names none (final layer excluded)."""
    return vllm_default_aux_layer_ids(num_hidden_layers)


@dataclass
class Eagle3Config:
    """Everything needed to build the draft; serialisable to/from speculators config.json."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # verifier vocabulary
    draft_vocab_size: int
    num_layers: int = 1
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False
    mlp_bias: bool = False
    norm_before_residual: bool = True
    target_hidden_size: int | None = None  # only when it differs from hidden_size
    num_aux_layers: int = 3
    aux_layer_ids: list[int] | None = None  # verifier layers feeding fc, when not default
    speculative_tokens: int = 3
    verifier_name_or_path: str | None = None
    verifier_architectures: list[str] = field(default_factory=list)
    # Draft layer style: "llama" or "qwen3" (per-head q/k RMSNorm before RoPE).
    draft_arch: str = "llama"
    # EAGLE-3.1 options (vLLM reads all three from the top level of config.json).
    norm_before_fc: bool = False  # one RMSNorm over the concatenated aux states before fc
    fc_norm: bool = False  # one RMSNorm per aux state before fc
    norm_output: bool = False  # feed the post-norm hidden state to the next drafting step
    # Sliding-window attention per draft layer ("full_attention" | "sliding_attention").
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    use_sliding_window: bool | None = None  # written back as read; implied by layer_types
    max_window_layers: int | None = None  # Qwen3 key; only written back
    embed_requires_grad: bool = False  # public-package training option; we never train embeddings

    def __post_init__(self) -> None:
        if self.draft_arch not in DRAFT_ARCHS:
            raise UserError(f"draft_arch {self.draft_arch!r} is not supported; use one of {', '.join(DRAFT_ARCHS)}")
        if self.norm_before_fc and self.fc_norm:
            raise UserError("norm_before_fc and fc_norm are mutually exclusive; enable one or neither")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise UserError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} draft layers; "
                    "give one per layer"
                )
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise UserError(f"layer_types: {bad} not supported; use full_attention or sliding_attention")
            if "sliding_attention" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
                raise UserError("layer_types names sliding_attention layers but sliding_window is not a positive int")

    @property
    def fc_input_size(self) -> int:
        return self.num_aux_layers * (self.target_hidden_size or self.hidden_size)

    def layer_window(self, layer_idx: int) -> int | None:
        """The attention window of draft layer `layer_idx` (None = full attention)."""
        if self.layer_types and self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None

    # ----------------------------------------------------------------- verifier
    @classmethod
    def from_verifier_config(
        cls,
        verifier_config: Any,
        *,
        draft_vocab_size: int | None = None,
        num_layers: int = 1,
        norm_before_residual: bool = True,
        aux_layer_ids: list[int] | None = None,
        speculative_tokens: int = 3,
        verifier_name_or_path: str | None = None,
        draft_arch: str = "llama",
        norm_before_fc: bool = False,
        fc_norm: bool = False,
        norm_output: bool = False,
        sliding_window: int | None = None,
        full_attention_indices: list[int] | None = None,
    ) -> Eagle3Config:
        """Shape the draft like one verifier decoder layer (GQA, head_dim, RoPE scaling)."""
        vc = text_config(verifier_config)
        default_ids = default_aux_layer_ids(vc.num_hidden_layers)
        ids = list(aux_layer_ids) if aux_layer_ids is not None else None
        if ids is not None:  # the rules datagen, launch-vllm and the trainer apply
            check_layer_ids([*ids, vc.num_hidden_layers], vc.num_hidden_layers, flag="aux_layer_ids (+ final)")
        if ids is not None and ids == default_ids:
            ids = None
        return cls(
            **verifier_layer_shape(verifier_config),
            draft_vocab_size=draft_vocab_size or vc.vocab_size,
            num_layers=num_layers,
            norm_before_residual=norm_before_residual,
            aux_layer_ids=ids,
            num_aux_layers=len(ids) if ids else 3,
            speculative_tokens=speculative_tokens,
            verifier_name_or_path=verifier_name_or_path,
            draft_arch=draft_arch,
            norm_before_fc=norm_before_fc,
            fc_norm=fc_norm,
            norm_output=norm_output,
            layer_types=sliding_layer_types(num_layers, sliding_window, full_attention_indices),
            sliding_window=sliding_window,
            use_sliding_window=True if sliding_window else None,
        )

    # -------------------------------------------------------------- config.json
    def transformer_layer_config(self) -> dict[str, Any]:
        """A LlamaConfig- or Qwen3Config-shaped dict; RoPE written both as `rope_parameters`
        (transformers >= 5) and as `rope_theta`/`rope_scaling` (older readers)."""
        out = transformer_layer_dict(self, self.draft_arch, DRAFT_ARCHS[self.draft_arch], rope_scaling=True)
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        for key in ("sliding_window", "use_sliding_window", "max_window_layers"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_speculators_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "speculators_model_type": "eagle3",
            "architectures": ["Eagle3Speculator"],
            "speculators_version": __version__,
            "transformer_layer_config": self.transformer_layer_config(),
            "draft_vocab_size": self.draft_vocab_size,
            "norm_before_residual": self.norm_before_residual,
            "norm_before_fc": self.norm_before_fc,
            "fc_norm": self.fc_norm,
            "norm_output": self.norm_output,
            "target_hidden_size": self.target_hidden_size,
            "speculators_config": {
                "algorithm": "eagle3",
                "proposal_methods": [
                    {
                        "proposal_type": "greedy",
                        "speculative_tokens": self.speculative_tokens,
                        "verifier_accept_k": 1,
                        "accept_tolerance": 0.0,
                    }
                ],
                "default_proposal_method": "greedy",
                "verifier": {
                    "name_or_path": self.verifier_name_or_path,
                    "architectures": list(self.verifier_architectures),
                },
            },
        }
        if self.aux_layer_ids:
            out["eagle_aux_hidden_state_layer_ids"] = list(self.aux_layer_ids)
        out["embed_requires_grad"] = self.embed_requires_grad
        return out

    @classmethod
    def from_speculators_dict(cls, d: dict[str, Any], source: str = "config.json") -> Eagle3Config:
        if d.get("speculators_model_type") != "eagle3":
            raise UserError(
                f"{source}: speculators_model_type is {d.get('speculators_model_type')!r}, "
                "expected 'eagle3'; point at an EAGLE-3 checkpoint directory"
            )
        try:
            tl = d["transformer_layer_config"]
            spec = d["speculators_config"]
            tokens = spec["proposal_methods"][0]["speculative_tokens"]
            verifier = spec["verifier"]
        except (KeyError, IndexError, TypeError) as exc:
            raise UserError(f"{source}: invalid speculators config structure ({exc!r} missing)") from exc
        check_known_keys(d, source)
        rope = tl.get("rope_parameters")
        if not rope:
            rope = dict(tl.get("rope_scaling") or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = tl.get("rope_theta", 10000.0)
        heads = tl["num_attention_heads"]
        ids = d.get("eagle_aux_hidden_state_layer_ids")
        return cls(
            hidden_size=tl["hidden_size"],
            intermediate_size=tl["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=tl.get("num_key_value_heads") or heads,
            head_dim=tl.get("head_dim") or tl["hidden_size"] // heads,
            vocab_size=tl["vocab_size"],
            draft_vocab_size=d.get("draft_vocab_size") or tl["vocab_size"],
            num_layers=tl.get("num_hidden_layers", 1),
            rms_norm_eps=tl.get("rms_norm_eps", 1e-6),
            hidden_act=tl.get("hidden_act", "silu"),
            max_position_embeddings=tl.get("max_position_embeddings", 4096),
            rope_parameters=rope,
            attention_bias=bool(tl.get("attention_bias", False)),
            mlp_bias=bool(tl.get("mlp_bias", False)),
            norm_before_residual=bool(d.get("norm_before_residual", True)),
            target_hidden_size=d.get("target_hidden_size"),
            aux_layer_ids=list(ids) if ids else None,
            num_aux_layers=len(ids) if ids else 3,
            speculative_tokens=int(tokens),
            verifier_name_or_path=verifier.get("name_or_path"),
            verifier_architectures=list(verifier.get("architectures") or []),
            draft_arch=tl.get("model_type", "llama"),
            norm_before_fc=bool(d.get("norm_before_fc", False)),
            fc_norm=bool(d.get("fc_norm", False)),
            norm_output=bool(d.get("norm_output", False)),
            layer_types=list(tl["layer_types"]) if tl.get("layer_types") is not None else None,
            sliding_window=tl.get("sliding_window"),
            use_sliding_window=tl.get("use_sliding_window"),
            max_window_layers=tl.get("max_window_layers"),
            embed_requires_grad=bool(d.get("embed_requires_grad", False)),
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_speculators_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Eagle3Config:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise UserError(f"{path}: not found; pass a checkpoint directory holding config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_speculators_dict(data, source=str(path))
        except UserError as exc:
            msg = str(exc)
            raise UserError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
