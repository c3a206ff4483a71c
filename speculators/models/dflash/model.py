"""The DFlash draft model: block-parallel drafting on the verifier's hidden states.

Layout and tensor names are those vLLM's ``DFlashQwen3ForCausalLM`` loads (weights saved
without the ``model.`` prefix, ``lm_head`` and ``d2t`` at the top):

* ``fc`` maps the concatenated aux states of the verifier (``num_aux * H``) to ``H`` and
  ``hidden_norm`` normalises them: these are the *context* states, one per verified position;
* every draft layer is a Qwen3 decoder layer (``q_norm``/``k_norm`` per head, RoPE) whose
  queries are the block's tokens ``[anchor, mask, ..., mask]`` (``embed_tokens``, frozen) at
  positions ``a .. a + block_size - 1``; its keys/values are the context states projected by
  the same ``k_proj``/``v_proj`` (with ``k_norm`` and RoPE at the context positions, no
  ``input_layernorm``) followed by the block's own keys/values;
* attention: a block sees the context strictly before its anchor and the whole block
  (non-causal); blocks never see each other;
* ``norm`` then ``lm_head`` (draft vocabulary, ``d2t`` maps to the verifier's).

Slot ``k`` (1..block_size-1) of the block anchored at the verifier's newest token ``a``
predicts the token at position ``a + k``; the anchor slot predicts nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speculators.errors import UserError
from speculators.models.dflash.config import DFlashConfig
from speculators.models.eagle3.model import MLP, RMSNorm, RotaryEmbedding, apply_rope
from speculators.models.weights_io import export_tensors, read_weights, write_weights



class DFlashAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, ctx, rope_q, rope_c, mask) -> torch.Tensor:
        """x `[B, Q, H]` block queries, ctx `[B, T, H]` normed context states, mask `[B, Q, T + Q]`."""
        b, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, *rope_q)
        k_q, v_q = self._kv(x, *rope_q)
        k_c, v_c = self._kv(ctx, *rope_c)
        k, v = torch.cat([k_c, k_q], dim=2), torch.cat([v_c, v_q], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.head_dim**-0.5,
                                             enable_gqa=self.num_heads != self.num_kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.self_attn = DFlashAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden, ctx, rope_q, rope_c, mask) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), ctx, rope_q, rope_c, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def block_mask(ctx_visible: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[B, N, T]` context visibility per block -> `[B, N*bs, T + N*bs]` attention mask
    (each slot sees its block's visible context and its whole block, no other block)."""
    b, n, t = ctx_visible.shape
    ctx = ctx_visible[:, :, None, :].expand(b, n, block_size, t).reshape(b, n * block_size, t)
    blk_id = torch.arange(n * block_size, device=ctx_visible.device) // block_size
    own = (blk_id[:, None] == blk_id[None, :]).expand(b, -1, -1)
    return torch.cat([ctx, own], dim=-1)


class DFlashDraftModel(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(config.fc_input_size, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.layers = nn.ModuleList([DFlashDecoderLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t.to(torch.long))
        self.t2d.copy_(t2d.to(torch.bool))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    # ------------------------------------------------------------------ core
    def blocks(self, aux_hidden: torch.Tensor, ctx_positions: torch.Tensor, anchor_ids: torch.Tensor,
               anchor_positions: torch.Tensor, ctx_visible: torch.Tensor) -> torch.Tensor:
        """Normed draft states of `N` blocks per row, `[B, N, block_size, H]`.

        aux_hidden `[B, T, num_aux*H_t]` verifier aux states at `ctx_positions [B, T]`;
        anchor_ids/anchor_positions `[B, N]`; ctx_visible `[B, N, T]` bool.
        """
        bs = self.config.block_size
        b, n = anchor_ids.shape
        ctx = self.hidden_norm(self.fc(aux_hidden))
        ids = torch.full((b, n, bs), self.config.mask_token_id, dtype=torch.long, device=anchor_ids.device)
        ids[:, :, 0] = anchor_ids
        with torch.no_grad():
            x = self.embed_tokens(ids.view(b, n * bs)).to(ctx.dtype)
        q_pos = (anchor_positions[:, :, None] + torch.arange(bs, device=ids.device)).view(b, n * bs)
        rope_q, rope_c = self.rotary(x, q_pos), self.rotary(ctx, ctx_positions)
        mask = block_mask(ctx_visible, bs)
        for layer in self.layers:
            x = layer(x, ctx, rope_q, rope_c, mask)
        return self.norm(x).view(b, n, bs, -1)

    @torch.no_grad()
    def propose(self, aux_hidden: torch.Tensor, anchor_id: int, num_tokens: int | None = None) -> torch.Tensor:
        """Greedy draft after a verified prefix: aux `[n, A]` at positions `0..n-1`, the anchor
        (the verifier's newest token) at position `n`. Returns the logits `[K, draft_vocab]` of
        slots 1..K (K = `num_tokens`, at most block_size - 1)."""
        k = self.config.speculative_tokens if num_tokens is None else num_tokens
        if not 1 <= k <= self.config.speculative_tokens:
            raise UserError(f"a DFlash draft with block_size {self.config.block_size} drafts 1.."
                            f"{self.config.speculative_tokens} tokens per step, not {k}")
        n, dev = aux_hidden.shape[0], aux_hidden.device
        normed = self.blocks(aux_hidden[None], torch.arange(n, device=dev)[None],
                             torch.tensor([[anchor_id]], device=dev), torch.tensor([[n]], device=dev),
                             torch.ones(1, 1, n, dtype=torch.bool, device=dev))
        return self.lm_head(normed[0, 0, 1 : k + 1])

    # ------------------------------------------------------------ save / load
    def export_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """Tensors under vLLM's names (`weights_io.export_tensors`; vLLM skips ``t2d``)."""
        return export_tensors(self.state_dict() if state is None else state, self.config.vocab_size)

    def save_pretrained(self, directory: str | Path, state: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        return write_weights(directory, self.export_state_dict(state))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> DFlashDraftModel:
        model = cls(DFlashConfig.load(Path(directory)))
        path, state = read_weights(directory, map_location)
        if "d2t" not in state and model.config.draft_vocab_size == model.config.vocab_size:
            state["d2t"], state["t2d"] = model.d2t.clone(), model.t2d.clone()
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("rotary.") and k != "t2d"]
        if missing or unexpected:
            raise UserError(f"{path}: tensors do not match config.json (missing {missing}, unexpected {unexpected})")
        return model.to(map_location)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]
