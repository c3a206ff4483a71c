"""DFlash draft configuration and its `config.json` form.

The on-disk form is the speculators ``dflash`` format that vLLM's speculators config
loader reads (``vllm/transformers_utils/configs/speculators/algos.py``, ``update_dflash``):

* ``speculators_model_type: "dflash"``; vLLM sets the architecture ``DFlashDraftModel``
  (``qwen3_dflash.py``) and the method ``dflash``;
* ``transformer_layer_config``: a Qwen3 config of the draft layers (heads, head_dim, RoPE
  from the verifier; ``num_hidden_layers`` = draft layers);
* ``aux_hidden_state_layer_ids`` (required): the verifier layers whose states feed ``fc``,
  numbered as everywhere here (id ``i`` = the residual stream entering decoder layer ``i``);
  vLLM passes them on as ``eagle_aux_hidden_state_layer_ids`` and ``target_layer_ids = i - 1``;
* ``mask_token_id`` (required): the token fed at the masked block slots;
* ``draft_vocab_size``, ``target_hidden_size``; ``sample_from_anchor`` false (the anchor is
  the verifier's bonus token, the ``block_size - 1`` masked slots are drafted);
* ``speculators_config.proposal_methods[0].speculative_tokens`` = ``block_size - 1``
  (vLLM's ``num_speculative_tokens``).

Attention is non-causal inside a block (vLLM's default for speculators checkpoints:
``sliding_window_non_causal`` absent).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from speculators import __version__
from speculators.errors import UserError
from speculators.layers import check_layer_ids
from speculators.models.layer_config import transformer_layer_dict, verifier_layer_shape
from speculators.verifier import text_config

# Top-level keys read into the config (anything else is refused by `from_speculators_dict`).
KNOWN_KEYS = frozenset({
    "speculators_model_type", "architectures", "speculators_version", "transformer_layer_config",
    "draft_vocab_size", "target_hidden_size", "aux_hidden_state_layer_ids", "mask_token_id",
    "block_size", "sample_from_anchor", "speculators_config", "torch_dtype", "dtype",
})


@dataclass
class DFlashConfig:
    """Everything needed to build a DFlash draft; serialisable to/from speculators config.json."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # verifier vocabulary
    draft_vocab_size: int
    aux_layer_ids: list[int]
    mask_token_id: int
    block_size: int = 8  # anchor + block_size - 1 drafted slots
    num_layers: int = 1
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False
    mlp_bias: bool = False
    target_hidden_size: int | None = None  # only when it differs from hidden_size
    verifier_name_or_path: str | None = None
    verifier_architectures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise UserError(f"block_size {self.block_size}: a DFlash block needs the anchor plus at least one slot")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise UserError(f"mask_token_id {self.mask_token_id} is outside the verifier vocabulary "
                            f"[0, {self.vocab_size})")
        if not self.aux_layer_ids:
            raise UserError("aux_hidden_state_layer_ids: a DFlash draft needs at least one verifier layer")

    @property
    def speculative_tokens(self) -> int:
        return self.block_size - 1

    @property
    def num_aux_layers(self) -> int:
        return len(self.aux_layer_ids)

    @property
    def fc_input_size(self) -> int:
        return self.num_aux_layers * (self.target_hidden_size or self.hidden_size)

    # ----------------------------------------------------------------- verifier
    @classmethod
    def from_verifier_config(cls, verifier_config: Any, *, aux_layer_ids: list[int], block_size: int,
                             mask_token_id: int | None = None, draft_vocab_size: int | None = None,
                             num_layers: int = 1, verifier_name_or_path: str | None = None) -> DFlashConfig:
        """Shape the draft layers like the verifier's (GQA, head_dim, RoPE)."""
        vc = text_config(verifier_config)
        n = int(vc.num_hidden_layers)
        check_layer_ids([*aux_layer_ids, n], n, flag="aux_layer_ids (+ final)")
        return cls(
            **verifier_layer_shape(verifier_config),
            draft_vocab_size=draft_vocab_size or vc.vocab_size,
            aux_layer_ids=[int(i) for i in aux_layer_ids],
            mask_token_id=int(vc.vocab_size - 1 if mask_token_id is None else mask_token_id),
            block_size=block_size,
            num_layers=num_layers,
            verifier_name_or_path=verifier_name_or_path,
        )

    # -------------------------------------------------------------- config.json
    def transformer_layer_config(self) -> dict[str, Any]:
        """A Qwen3Config-shaped dict (no legacy `rope_scaling`: vLLM's DFlash reads transformers >= 5 keys)."""
        return transformer_layer_dict(self, "qwen3", "Qwen3ForCausalLM", rope_scaling=False)

    def to_speculators_dict(self) -> dict[str, Any]:
        return {
            "speculators_model_type": "dflash",
            "architectures": ["DFlashSpeculator"],
            "speculators_version": __version__,
            "transformer_layer_config": self.transformer_layer_config(),
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "aux_hidden_state_layer_ids": list(self.aux_layer_ids),
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "sample_from_anchor": False,
            "speculators_config": {
                "algorithm": "dflash",
                "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": self.speculative_tokens,
                                      "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": self.verifier_name_or_path,
                             "architectures": list(self.verifier_architectures)},
            },
        }

    @classmethod
    def from_speculators_dict(cls, d: dict[str, Any], source: str = "config.json") -> DFlashConfig:
        if d.get("speculators_model_type") != "dflash":
            raise UserError(f"{source}: speculators_model_type is {d.get('speculators_model_type')!r}, "
                            "expected 'dflash'")
        unknown = sorted(set(d) - KNOWN_KEYS)
        if unknown:
            raise UserError(f"{source}: keys {unknown} are not implemented by this DFlash draft; "
                            "it would be evaluated as a different model")
        if d.get("sample_from_anchor"):
            raise UserError(f"{source}: sample_from_anchor true is not implemented (the anchor is the bonus token)")
        try:
            tl = d["transformer_layer_config"]
            spec = d["speculators_config"]
            tokens = int(spec["proposal_methods"][0]["speculative_tokens"])
            verifier = spec["verifier"]
            ids = list(d["aux_hidden_state_layer_ids"])
            mask = int(d["mask_token_id"])
        except (KeyError, IndexError, TypeError) as exc:
            raise UserError(f"{source}: invalid DFlash speculators config ({exc!r} missing)") from exc
        block = int(d.get("block_size") or tokens + 1)
        if block - 1 != tokens:
            raise UserError(f"{source}: block_size {block} disagrees with speculative_tokens {tokens} "
                            "(vLLM drafts block_size - 1 tokens)")
        heads = tl["num_attention_heads"]
        rope = tl.get("rope_parameters") or {"rope_type": "default", "rope_theta": tl.get("rope_theta", 10000.0)}
        return cls(
            hidden_size=tl["hidden_size"], intermediate_size=tl["intermediate_size"], num_attention_heads=heads,
            num_key_value_heads=tl.get("num_key_value_heads") or heads,
            head_dim=tl.get("head_dim") or tl["hidden_size"] // heads, vocab_size=tl["vocab_size"],
            draft_vocab_size=d.get("draft_vocab_size") or tl["vocab_size"], aux_layer_ids=[int(i) for i in ids],
            mask_token_id=mask, block_size=block, num_layers=tl.get("num_hidden_layers", 1),
            rms_norm_eps=tl.get("rms_norm_eps", 1e-6), hidden_act=tl.get("hidden_act", "silu"),
            max_position_embeddings=tl.get("max_position_embeddings", 4096), rope_parameters=dict(rope),
            attention_bias=bool(tl.get("attention_bias", False)), mlp_bias=bool(tl.get("mlp_bias", False)),
            target_hidden_size=d.get("target_hidden_size"), verifier_name_or_path=verifier.get("name_or_path"),
            verifier_architectures=list(verifier.get("architectures") or []),
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_speculators_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> DFlashConfig:
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


def speculators_model_type(directory: str | Path) -> str | None:
    """The ``speculators_model_type`` of a checkpoint directory (None if unreadable)."""
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("speculators_model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
