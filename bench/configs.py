"""Draft shapes the benchmarks train, shared by our harness and the public-package runner.

`llama8b` is a single-layer EAGLE-3 draft for Llama-3.1-8B (H=4096, 32 heads, 8 KV heads,
intermediate 14336, target vocab 128256, draft vocab 32000, TTT 3) and is meant for a GPU
at seq 2048/8192; on a CPU it runs at a much shorter sequence (see `cpu_seq_len`).
`tiny` matches the tiny verifiers in `speculators.tiny.builders` (hidden 64, vocab 512).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class DraftShape:
    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    target_vocab: int
    draft_vocab: int
    num_layers: int = 1
    num_aux_layers: int = 3
    ttt_steps: int = 3
    seq_len: int = 2048  # the GPU figure
    cpu_seq_len: int = 2048  # what a CPU run uses by default
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def with_seq(self, seq_len: int) -> "DraftShape":
        return replace(self, seq_len=seq_len, cpu_seq_len=seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    # --- sizes -------------------------------------------------------------------------
    def param_counts(self, train_lm_head: bool = True) -> dict[str, int]:
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        first_attn = 2 * h * (q + 2 * kv) + q * h
        attn = h * (q + 2 * kv) + q * h
        mlp = 3 * h * i
        layers = first_attn + mlp + (self.num_layers - 1) * (attn + mlp)
        fc = self.num_aux_layers * h * h
        lm_head = h * self.draft_vocab
        trainable = layers + fc + (lm_head if train_lm_head else 0)
        return {
            "decoder_layers": layers,
            "fc": fc,
            "lm_head": lm_head,
            "embed_tokens_frozen": self.target_vocab * h,
            "verifier_lm_head_frozen": lm_head,
            "trainable": trainable,
        }

    def flops_per_step(self, tokens: int, train_lm_head: bool = True, attn_tokens: int | None = None) -> dict[str, float]:
        """Model FLOPs of one training step over a packed row of `tokens` tokens.

        Per TTT step: forward 2*N_matmul*T, backward 4*N (weight + input grads; a frozen
        lm_head skips the weight grad, 2*N) plus attention 4*T*S*d per layer forward
        (QK^T and PV, S = keys attended, about T/2 causal for step 0 + s diagonal keys)
        and twice that backward. The frozen verifier lm_head (targets, forward only) is
        counted once. Elementwise ops (norms, softmax, KL) are left out: they are
        bandwidth-bound, not FLOPs-bound.
        """
        p = self.param_counts(train_lm_head)
        t = tokens
        dense = p["decoder_layers"] + p["fc"]
        lm = p["lm_head"]
        q_dim = self.num_heads * self.head_dim
        fwd = bwd = 0.0
        fwd_fc = 2 * p["fc"] * t  # fc runs once, before the TTT loop
        bwd_fc = 4 * p["fc"] * t
        for s in range(self.ttt_steps):
            layer_params = dense - p["fc"]
            keys = (attn_tokens or t) / 2 + s
            attn = 4 * t * keys * q_dim * self.num_layers
            fwd += 2 * layer_params * t + 2 * lm * t + attn
            bwd += 4 * layer_params * t + (4 if train_lm_head else 2) * lm * t + 2 * attn
        targets = 2 * lm * t
        total = fwd + bwd + fwd_fc + bwd_fc + targets
        return {"forward": fwd + fwd_fc + targets, "backward": bwd + bwd_fc, "total": total}


SHAPES: dict[str, DraftShape] = {
    "tiny": DraftShape(
        name="tiny", hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
        target_vocab=512, draft_vocab=256, seq_len=256, cpu_seq_len=256,
        rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-6,
    ),
    "small": DraftShape(
        name="small", hidden_size=1024, num_heads=16, num_kv_heads=4, intermediate_size=2816,
        target_vocab=32000, draft_vocab=8192, seq_len=2048, cpu_seq_len=512,
    ),
    "llama8b": DraftShape(
        name="llama8b", hidden_size=4096, num_heads=32, num_kv_heads=8, intermediate_size=14336,
        target_vocab=128256, draft_vocab=32000, seq_len=2048, cpu_seq_len=256,
    ),
}


def get_shape(name: str, seq_len: int | None = None) -> DraftShape:
    try:
        shape = SHAPES[name]
    except KeyError:
        raise SystemExit(f"unknown draft shape {name!r}; choose from {sorted(SHAPES)}")
    return shape.with_seq(seq_len) if seq_len else shape
