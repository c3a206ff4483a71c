"""The EAGLE-3 draft model.

Layout (and state-dict names) follow what vLLM's Llama EAGLE-3 draft loads:
`fc` fuses the verifier's auxiliary hidden states (3 x H) into H; layer 0 attends over
`[input_layernorm(embed), hidden_norm(hidden)]` (2H wide q/k/v), later layers are plain
Llama layers over H; final `norm`; `lm_head` to the draft vocabulary; `d2t`/`t2d` map
between draft and verifier vocabularies (`target = i + d2t[i]`).  The hidden state fed to
the next drafting step is the *pre-norm* output of the last layer (the post-norm one with
`norm_output`, EAGLE-3.1).

Options vLLM reads from config.json, with the same tensor names: `draft_arch="qwen3"` adds
per-head `self_attn.q_norm`/`k_norm` before RoPE; `norm_before_fc` one `input_norm` over
the concatenated aux states, `fc_norm` one `fc_norm.<i>` per aux state; `layer_types` +
`sliding_window` restrict a layer's context keys to the last `sliding_window` positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from speculators.errors import UserError
from speculators.models.eagle3.attention import (
    cached_causal_attention,
    ttt_attention_flex,
    ttt_attention_sdpa,
    windowed,
)
from speculators.models.eagle3.config import Eagle3Config
from speculators.models.eagle3.ttt_mask import context_mask, shift_tokens
from speculators.models.weights_io import export_tensors, read_weights, write_weights



class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x[b, rows[b, j]]`: `[B, T, ...]` -> `[B, N, ...]` (-1 pads read position 0; unused)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], rows.clamp(min=0)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, H, T, d]`, cos/sin `[B, T, d]`; keeps x's dtype (q/k/v must agree under autocast)."""
    return (x * cos[:, None] + _rotate_half(x) * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config, in_size: int):
        super().__init__()
        self.qk_norm = cfg.draft_arch == "qwen3"
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(in_size, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(in_size, self.num_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(in_size, self.num_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Keys/values at every position of `x`; queries (and the output) only at `rows` `[B, N]` if given."""
        b, t, _ = x.shape
        xq, cq, sq = (x, cos, sin) if rows is None else (gather_rows(x, rows), gather_rows(cos, rows), gather_rows(sin, rows))
        tq = xq.shape[1]
        q = self.q_proj(xq).view(b, tq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cq, sq), apply_rope(k, cos, sin)
        out = attend(q, k, v, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, tq, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        from transformers.activations import ACT2FN

        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Layer 0 takes `[embed, hidden]` (2H); later layers are standard pre-norm Llama layers."""

    def __init__(self, cfg: Eagle3Config, layer_idx: int):
        super().__init__()
        self.first = layer_idx == 0
        self.norm_before_residual = cfg.norm_before_residual
        h = cfg.hidden_size
        self.self_attn = Attention(cfg, 2 * h if self.first else h)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        if self.first:
            self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, hidden, embeds, cos, sin, attend, rows=None) -> torch.Tensor:
        """`rows` `[B, N]`: keys/values from every position, output only at `rows` (`[B, N, H]`)."""
        if self.first:
            normed = self.hidden_norm(hidden)
            residual = normed if self.norm_before_residual else hidden
            x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        else:
            residual = hidden
            x = self.input_layernorm(hidden)
        if rows is not None:
            residual = gather_rows(residual, rows)
        hidden = residual + self.self_attn(x, cos, sin, attend, rows)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class RotaryEmbedding(nn.Module):
    """RoPE with the verifier's scaling (computed by transformers' rope utilities)."""

    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        lc = LlamaConfig(
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters=dict(cfg.rope_parameters),
        )
        self.inner = LlamaRotaryEmbedding(lc)

    def forward(self, like: torch.Tensor, position_ids: torch.Tensor):
        return self.inner(like, position_ids)


@dataclass
class DraftCache:
    """Per-layer keys/values for cached drafting (inference).  `length` = cached tokens."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def truncate(self, length: int) -> None:
        """Drop cached entries past `length` (e.g. rejected draft tokens)."""
        self.keys = [None if k is None else k[:, :, :length] for k in self.keys]
        self.values = [None if v is None else v[:, :, :length] for v in self.values]


@dataclass
class DraftOutput:
    logits: torch.Tensor  # [B, t, draft_vocab]
    hidden_prenorm: torch.Tensor  # [B, t, H]: feed back as the next step's hidden state (post-norm under norm_output)
    cache: DraftCache


class Eagle3DraftModel(nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(config.fc_input_size, h, bias=False)
        if config.norm_before_fc:
            self.input_norm = RMSNorm(config.fc_input_size, config.rms_norm_eps)
        if config.fc_norm:
            aux_size = config.target_hidden_size or h
            self.fc_norm = nn.ModuleList([RMSNorm(aux_size, config.rms_norm_eps) for _ in range(config.num_aux_layers)])
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        self.attn_impl = "auto"  # "auto" | "sdpa" | "flex" | "flex_eager"
        # Training: recompute each decoder layer in backward (torch.utils.checkpoint, non-reentrant).
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ vocab
    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t.to(torch.long))
        self.t2d.copy_(t2d.to(torch.bool))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    # ------------------------------------------------------------------ core
    def fuse(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """`[.., num_aux * H_target]` verifier aux states -> `[.., H]` (with the EAGLE-3.1 norms)."""
        x = aux_hidden_states
        if self.config.norm_before_fc:
            x = self.input_norm(x)
        if self.config.fc_norm:
            chunks = x.chunk(self.config.num_aux_layers, dim=-1)
            x = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks, strict=True)], dim=-1)
        return self.fc(x)

    def _layers(self, hidden, embeds, position_ids, attend_for_layer, last_rows=None) -> torch.Tensor:
        """`last_rows` `[B, N]`: the last layer's output only at those positions."""
        cos, sin = self.rotary(hidden, position_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = last_rows if i == last else None
            if recompute:
                # The layer runs again in backward with the same `attend` (which must therefore
                # not depend on state changed after its first call, see iter_ttt).
                from torch.utils.checkpoint import checkpoint

                hidden = checkpoint(layer, hidden, embeds, cos, sin, attend_for_layer(i), rows, use_reentrant=False)
            else:
                hidden = layer(hidden, embeds, cos, sin, attend_for_layer(i), rows)
        return hidden

    def _use_flex(self, device: torch.device) -> bool:
        return self.attn_impl.startswith("flex") or (self.attn_impl == "auto" and device.type == "cuda")

    def iter_ttt(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        document_ids: torch.Tensor,
        position_ids: torch.Tensor,
        ttt_steps: int,
        query_rows: torch.Tensor | None = None,
    ):
        """Unroll the draft `ttt_steps` times; yield `(step, normed_hidden [B, T, H])`.

        Step `s` feeds step `s-1`'s pre-norm output with the tokens shifted left by `s`
        (teacher forcing) at positions `position_ids + s`; its queries see the context keys
        and their own position's keys from earlier steps.

        `query_rows` `[B, N]` (`ttt_mask.ttt_query_rows`): yield `[B, N, H]` at those positions
        only. By the rule above a position's later steps touch no other position, and its
        step-0 output only its own later steps; so step 0 runs the last layer's queries (and
        MLP) only there, and steps 1.. run on those `N` positions alone (every step-0 key/value
        is still made: it is every query's context). SDPA and flex attention alike take those
        compact queries (SDPA through the gathered context mask, flex through its mask's
        row-to-position map).
        """
        hidden = self.fuse(hidden_states)
        use_flex = self._use_flex(hidden.device)
        rows = query_rows
        kv: list[tuple[list, list]] = [([], []) for _ in self.layers]
        block_masks: dict = {}
        ctx_masks: dict = {}

        def ctx_for(window, compact):
            if (window, compact) not in ctx_masks:
                mask = windowed(context_mask(document_ids), window)
                ctx_masks[(window, compact)] = gather_rows(mask, rows) if compact else mask
            return ctx_masks[(window, compact)]

        def attend_for_layer(i, compact=False):
            all_keys, all_values = kv[i]
            # The earlier steps' keys/values as of this call: under gradient checkpointing the
            # layer (and so `attend`) runs again in backward, when later steps have added theirs.
            past_k, past_v = list(all_keys), list(all_values)
            window = self.config.layer_window(i)

            def attend(q, k, v, scale):
                if len(all_keys) == len(past_k):  # the first run (not a recompute) publishes k, v
                    all_keys.append(k)
                    all_values.append(v)
                keys, values = past_k + [k], past_v + [v]
                # A step-s query sits s positions past its context keys (as when drafting):
                # its window over them is s shorter, so training matches vLLM's inference.
                step_window = None if window is None else ttt_window(window, len(keys) - 1)
                if use_flex:
                    return ttt_attention_flex(
                        q, keys, values, document_ids, scale, block_masks.setdefault(window, {}),
                        compile=self.attn_impl != "flex_eager", window=step_window,
                        query_pos=rows if compact else None,
                    )
                # compact: queries (and steps >= 1's keys) at `rows`; context keys at every position
                return ttt_attention_sdpa(q, keys, values, ctx_for(step_window, compact), scale)

            return attend

        last = len(self.layers) - 1
        for step in range(ttt_steps):
            tokens, positions = shift_tokens(input_ids, step), position_ids + step
            if rows is not None and step > 0:
                tokens, positions = gather_rows(tokens, rows), gather_rows(positions, rows)
            with torch.no_grad():
                embeds = self.embed_tokens(tokens)
            embeds = embeds.to(hidden.dtype)
            if rows is None:
                hidden = self._layers(hidden, embeds, positions, attend_for_layer)
            elif step == 0:
                hidden = self._layers(hidden, embeds, positions, lambda i: attend_for_layer(i, i == last), rows)
            else:
                hidden = self._layers(hidden, embeds, positions, lambda i: attend_for_layer(i, True))
            normed = self.norm(hidden)
            if self.config.norm_output:
                hidden = normed
            yield step, normed

    def forward(self, hidden_states, input_ids, document_ids, position_ids, ttt_steps: int = 1):
        """Logits per TTT step (list of `[B, T, draft_vocab]`); training uses `iter_ttt`."""
        return [self.lm_head(h) for _, h in self.iter_ttt(hidden_states, input_ids, document_ids, position_ids, ttt_steps)]

    # ------------------------------------------------------------- inference
    @torch.no_grad()
    def draft_forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DraftCache | None = None,
        fused: bool = False,
    ) -> DraftOutput:
        """One cached drafting forward over `t` new positions (no padding; causal).

        hidden_states: `[B, t, num_aux * H]` verifier aux states (`fused=False`) or `[B, t, H]`
        `hidden_prenorm` outputs of a previous call (`fused=True`).  input_ids: `[B, t]` verifier-vocab
        tokens, position_ids `[B, t]`.
        """
        cache = cache or DraftCache()
        if not cache.keys:
            cache.keys = [None] * len(self.layers)
            cache.values = [None] * len(self.layers)
        hidden = hidden_states if fused else self.fuse(hidden_states)
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)

        def attend_for_layer(i):
            window = self.config.layer_window(i)

            def attend(q, k, v, scale):
                if cache.keys[i] is not None:
                    k = torch.cat([cache.keys[i], k], dim=2)
                    v = torch.cat([cache.values[i], v], dim=2)
                cache.keys[i], cache.values[i] = k, v
                return cached_causal_attention(q, k, v, scale, window)

            return attend

        hidden = self._layers(hidden, embeds, position_ids, attend_for_layer)
        normed = self.norm(hidden)
        # The state fed to the next drafting step: post-norm under norm_output (as vLLM does).
        return DraftOutput(self.lm_head(normed), normed if self.config.norm_output else hidden, cache)

    @torch.no_grad()
    def propose(
        self, aux_hidden_states: torch.Tensor, next_ids: torch.Tensor, num_tokens: int, start_position: int = 1
    ) -> tuple[torch.Tensor, DraftCache]:
        """Greedy chain of `num_tokens` drafted verifier-vocab ids, recomputing the prefix.

        aux_hidden_states `[B, L, num_aux*H]` are the verifier's aux layers at positions
        `0..L-1`, next_ids `[B, L]` the tokens at positions `1..L` (the last one is the
        verifier's newest token).  Returns `([B, num_tokens] target ids, cache)`.
        """
        b, length, _ = aux_hidden_states.shape
        dev = aux_hidden_states.device
        pos = torch.arange(start_position, start_position + length, device=dev).expand(b, length)
        out = self.draft_forward(aux_hidden_states, next_ids, pos, None, fused=False)
        drafted = []
        for k in range(num_tokens):
            tok = self.draft_to_target(out.logits[:, -1].argmax(-1))
            drafted.append(tok)
            if k + 1 == num_tokens:
                break
            p = torch.full((b, 1), start_position + length + k, device=dev, dtype=torch.long)
            out = self.draft_forward(out.hidden_prenorm[:, -1:], tok[:, None], p, out.cache, fused=True)
        return torch.stack(drafted, dim=1), out.cache

    # ------------------------------------------------------------ save / load
    def export_state_dict(self, state: dict | None = None) -> dict[str, torch.Tensor]:
        """Tensors under the names vLLM's eagle3 loader expects (`weights_io.export_tensors`)."""
        return export_tensors(self.state_dict() if state is None else state, self.config.vocab_size)

    def save_pretrained(self, directory: str | Path, state: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        return write_weights(directory, self.export_state_dict(state))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Eagle3DraftModel:
        directory = Path(directory)
        config = Eagle3Config.load(directory)
        model = cls(config)
        path, state = read_weights(directory, map_location)
        if "embed_tokens.weight" not in state and config.verifier_name_or_path:
            # Checkpoints may leave out the (frozen, verifier-copied) embedding.
            from speculators.verifier import load_verifier_weights, read_verifier_config

            vconf = read_verifier_config(config.verifier_name_or_path)
            state["embed_tokens.weight"] = load_verifier_weights(config.verifier_name_or_path, vconf)["embed"]
        if "d2t" not in state and "t2d" not in state and config.draft_vocab_size == config.vocab_size:
            # A full-vocabulary draft needs no mapping; the public package then saves none.
            state["d2t"], state["t2d"] = model.d2t.clone(), model.t2d.clone()
        missing, unexpected = model.load_state_dict(state, strict=False)
        identity_mapping = ("d2t", "t2d") if config.draft_vocab_size == config.vocab_size else ()
        missing = [k for k in missing if not k.startswith("rotary.") and k not in identity_mapping]
        if missing or unexpected:
            raise UserError(f"{path}: tensors do not match config.json (missing {missing}, unexpected {unexpected})")
        return model.to(map_location)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


def ttt_window(window: int, step: int) -> int:
    """The window over step-0 (context) keys seen by a TTT step-`step` query.

    Drafting token `step` of a chain happens at `step` positions past the verified prefix, so a
    `window`-token layer sees `window - step` of the prefix's keys (vLLM's rule).  The public
    package keeps `window` at every step; the two differ by `step` keys, only where the window
    binds.  Windows must exceed the TTT depth.
    """
    if window - step < 1:
        raise UserError(f"sliding_window {window} must exceed the TTT steps ({step + 1} or more)")
    return window - step


def logits_to_target_vocab(logits: torch.Tensor, d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Scatter draft-vocab logits into a verifier-vocab tensor (-inf elsewhere)."""
    out = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    idx = torch.arange(logits.shape[-1], device=logits.device) + d2t
    out[..., idx] = logits
    return out


__all__ = ["DraftCache", "DraftOutput", "Eagle3Config", "Eagle3DraftModel", "logits_to_target_vocab"]
