"""EAGLE-3 draft configuration and its `config.json` form.

The on-disk form is the speculators eagle3 format that vLLM's speculators config
loader reads (`speculators_model_type`, `transformer_layer_config`, `speculators_config`,
plus the eagle3 top-level fields).  The draft layers are always Llama-style; the shape
(heads, head_dim, intermediate size, RoPE with its scaling) comes from the verifier.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from speculators import __version__
from speculators.errors import UserError
from speculators.layers import vllm_default_aux_layer_ids
from speculators.verifier import text_config

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

    @property
    def fc_input_size(self) -> int:
        return self.num_aux_layers * (self.target_hidden_size or self.hidden_size)

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
    ) -> Eagle3Config:
        """Shape the draft like one verifier decoder layer (GQA, head_dim, RoPE scaling)."""
        vc = text_config(verifier_config)
        heads = vc.num_attention_heads
        head_dim = getattr(vc, "head_dim", None) or vc.hidden_size // heads
        default_ids = default_aux_layer_ids(vc.num_hidden_layers)
        ids = list(aux_layer_ids) if aux_layer_ids is not None else None
        if ids is not None and ids == default_ids:
            ids = None
        return cls(
            hidden_size=vc.hidden_size,
            intermediate_size=vc.intermediate_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(vc, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=vc.vocab_size,
            draft_vocab_size=draft_vocab_size or vc.vocab_size,
            num_layers=num_layers,
            rms_norm_eps=getattr(vc, "rms_norm_eps", 1e-6),
            hidden_act=getattr(vc, "hidden_act", "silu"),
            max_position_embeddings=getattr(vc, "max_position_embeddings", 4096),
            rope_parameters=_rope_parameters(vc),
            attention_bias=bool(getattr(vc, "attention_bias", False)),
            mlp_bias=bool(getattr(vc, "mlp_bias", False)),
            norm_before_residual=norm_before_residual,
            aux_layer_ids=ids,
            num_aux_layers=len(ids) if ids else 3,
            speculative_tokens=speculative_tokens,
            verifier_name_or_path=verifier_name_or_path,
            verifier_architectures=list(getattr(vc, "architectures", None) or getattr(verifier_config, "architectures", None) or []),
        )

    # -------------------------------------------------------------- config.json
    def transformer_layer_config(self) -> dict[str, Any]:
        """A LlamaConfig-shaped dict; RoPE written both as `rope_parameters`
        (transformers >= 5) and as `rope_theta`/`rope_scaling` (older readers)."""
        rope = copy.deepcopy(self.rope_parameters)
        theta = rope.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tie_word_embeddings": False,
            "rope_parameters": rope,
            "rope_theta": theta,
            "rope_scaling": scaling,
        }

    def to_speculators_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "speculators_model_type": "eagle3",
            "architectures": ["Eagle3Speculator"],
            "speculators_version": __version__,
            "transformer_layer_config": self.transformer_layer_config(),
            "draft_vocab_size": self.draft_vocab_size,
            "norm_before_residual": self.norm_before_residual,
            "norm_before_fc": False,
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
        return cls.from_speculators_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rope_parameters(vc: Any) -> dict[str, Any]:
    """The verifier's RoPE settings as one dict (rope_type, rope_theta, scaling keys)."""
    rope = getattr(vc, "rope_parameters", None)
    if isinstance(rope, dict) and rope:
        # Per-layer-type dicts (e.g. {"full_attention": {...}}) -> take full attention.
        if "rope_type" not in rope and "full_attention" in rope:
            rope = rope["full_attention"]
        out = dict(rope)
    else:
        out = dict(getattr(vc, "rope_scaling", None) or {})
        if "type" in out and "rope_type" not in out:
            out["rope_type"] = out.pop("type")
        out.setdefault("rope_theta", getattr(vc, "rope_theta", 10000.0))
    out.setdefault("rope_type", "default")
    out.setdefault("rope_theta", 10000.0)
    return out
