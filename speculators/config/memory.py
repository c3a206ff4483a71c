"""How much memory a training run needs, estimated before it starts, and the refusal.

The estimate adds what the trainer keeps alive at its peak (one optimizer step):
weights (draft + the verifier's embedding and lm_head rows), gradients and AdamW state,
the batch's hidden states, the activations kept for backward over every TTT step, the
attention masks and scores that grow with the square of the row length on the masked-SDPA
path (the CPU default), the verifier's target log-probabilities and the loss logits, plus
the runtime's own footprint. It is a planning figure (bench/memory_estimate.py compares
it with measured peaks), used to refuse runs that cannot fit long before they would fail.

DFlash drafts (`--algorithm dflash`) have their own arithmetic (`estimate_dflash_train_memory`):
one forward over `anchors x block_size` query tokens that attend to the row's context states,
so their square term is `queries x (context + queries)` on every path (their attention always
takes an explicit mask: no flex) and their activations scale with the blocks, not TTT steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speculators.config.device import resolve_device
from speculators.errors import UserError

GiB = 1 << 30
RUNTIME_BYTES = int(0.45 * GiB)  # python + torch + transformers loaded: measured peak RSS of a tiny run


@dataclass(frozen=True)
class VerifierDims:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_hidden_layers: int

    @classmethod
    def from_config(cls, cfg: Any) -> VerifierDims:
        """From a transformers config or its config.json dict (text_config of multimodal models)."""
        get = (lambda c, k: c.get(k)) if isinstance(cfg, dict) else (lambda c, k: getattr(c, k, None))
        text = get(cfg, "text_config")
        if text is not None and get(cfg, "hidden_size") is None:
            cfg = text
        h = int(get(cfg, "hidden_size"))
        heads = int(get(cfg, "num_attention_heads") or 1)
        return cls(
            hidden_size=h,
            intermediate_size=int(get(cfg, "intermediate_size") or 4 * h),
            num_heads=heads,
            num_kv_heads=int(get(cfg, "num_key_value_heads") or heads),
            head_dim=int(get(cfg, "head_dim") or h // heads),
            vocab_size=int(get(cfg, "vocab_size")),
            num_hidden_layers=int(get(cfg, "num_hidden_layers")),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # name -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        biggest = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return f"about {gib(self.total)} (" + ", ".join(f"{k} {gib(v)}" for k, v in biggest if v) + ")"


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.0f} MiB"


def _shared_parts(draft: int, trainable: int, *, h: int, v: int, vd: int, tokens: int, num_aux_layers: int,
                  act: int, loss_rows: int, loss_impl: str, on_gpu: bool) -> dict[str, int]:
    """The parts both objectives have: weights (the draft with its frozen embedding, the verifier
    head, the loaded embedding and lm_head), gradients and AdamW state of what trains, the hidden
    states read, the verifier's target log-probs, the loss logits over `loss_rows` rows, the runtime."""
    return {
        "weights": 4 * (draft + v * h + vd * h) + 4 * 2 * v * h,
        "gradients+AdamW": 4 * 3 * trainable,
        "hidden states": tokens * (num_aux_layers + 1) * h * act,
        "target log-probs": tokens * vd * 4,
        "loss logits": (loss_rows * vd * 4) * (3 if loss_impl == "eager" else 1) if loss_impl != "chunked" else 0,
        "runtime": 0 if on_gpu else RUNTIME_BYTES,
    }


def estimate_train_memory(
    dims: VerifierDims,
    *,
    total_seq_len: int,
    ttt_steps: int,
    num_layers: int = 1,
    draft_vocab_size: int | None = None,
    rows_per_batch: int = 1,
    num_aux_layers: int = 3,
    on_gpu: bool = False,
    bf16: bool = False,
    flex: bool = False,
    loss_impl: str = "fused",
    freeze_lm_head: bool = False,
) -> MemoryEstimate:
    """Peak bytes of one training process (pure arithmetic on the shapes); a frozen lm_head
    (`--freeze-lm-head`) has no gradient or AdamW state."""
    h, i, v = dims.hidden_size, dims.intermediate_size, dims.vocab_size
    vd = draft_vocab_size or v
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    t = total_seq_len
    b = rows_per_batch
    tokens = b * t
    k = ttt_steps
    act = 2 if bf16 else 4
    layer_params = 2 * h * (q + 2 * kv) + q * h + 3 * h * i + 3 * h  # layer 0 attends over [embeds, hidden]
    draft = num_aux_layers * h * h + num_layers * layer_params + h * vd + h
    trainable = draft - (h * vd if freeze_lm_head else 0)
    parts = _shared_parts(draft, trainable, h=h, v=v, vd=vd, tokens=tokens, num_aux_layers=num_aux_layers,
                          act=act, loss_rows=k * tokens, loss_impl=loss_impl, on_gpu=on_gpu)
    parts["activations"] = k * num_layers * tokens * (10 * h + 4 * i + 3 * (q + kv)) * act + k * tokens * 4 * h * act
    if not flex:
        # context mask [B, T, T] bool and its temporaries; steps >= 1 keep scores, softmax and
        # probabilities [B, heads, T, T] per layer for backward (factors fitted to measured peaks of
        # T = 256..4096 runs: bench/results/memory_estimate.json).
        parts["attention (T^2)"] = 4 * b * t * t + max(0, k - 1) * num_layers * 5 * b * dims.num_heads * t * t * act // 2
    return MemoryEstimate(parts)


def dflash_queries(total_seq_len: int, block_size: int, num_anchors: int) -> tuple[int, int]:
    """(anchors per row, query tokens per row) at most: every counted position of a full row
    anchors a block unless `num_anchors` (0 = all) caps them (`dflash_objective.pick_anchors`)."""
    n = min(num_anchors, total_seq_len) if num_anchors else total_seq_len
    return n, n * block_size


def estimate_dflash_train_memory(
    dims: VerifierDims,
    *,
    total_seq_len: int,
    block_size: int,
    num_anchors: int = 512,
    num_layers: int = 1,
    draft_vocab_size: int | None = None,
    rows_per_batch: int = 1,
    num_aux_layers: int = 3,
    on_gpu: bool = False,
    bf16: bool = False,
    loss_impl: str = "fused",
    freeze_lm_head: bool = False,
) -> MemoryEstimate:
    """Peak bytes of one DFlash training process (pure arithmetic on the shapes); a frozen lm_head
    (`--freeze-lm-head`) has no gradient or AdamW state.

    Per row: T context states (fc + hidden_norm of the aux states; every layer projects them to
    keys/values), Q = anchors x block_size query tokens through every layer, one attention of
    [Q, T + Q] per head and layer, and the loss over anchors x (block_size - 1) slots.
    """
    h, i, v = dims.hidden_size, dims.intermediate_size, dims.vocab_size
    vd = draft_vocab_size or v
    q, kv, hd = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.head_dim
    t, b, nl = total_seq_len, rows_per_batch, num_layers
    n, qt = dflash_queries(t, block_size, num_anchors)
    slots = n * (block_size - 1)
    act = 2 if bf16 else 4
    math_sdpa = on_gpu and dims.num_heads != dims.num_kv_heads  # see the attention part below
    layer_params = 2 * h * q + 2 * h * kv + 3 * h * i + 2 * h + 2 * hd  # q/k/v/o, MLP, 2 norms, q/k norms
    draft = num_aux_layers * h * h + nl * layer_params + 2 * h + h * vd  # fc, layers, norms, lm_head
    trainable = draft - (h * vd if freeze_lm_head else 0)
    keys = t + qt
    parts = _shared_parts(draft, trainable, h=h, v=v, vd=vd, tokens=b * t, num_aux_layers=num_aux_layers,
                          act=act, loss_rows=b * slots, loss_impl=loss_impl, on_gpu=on_gpu)
    # per layer: the block tokens through a decoder layer, the context keys/values (k_norm, RoPE,
    # the [context, block] concatenation; the math path repeats them per head); fc/hidden_norm
    # of the context, the final norm and the slots' gathered states once
    parts["activations"] = b * act * (nl * (qt * (10 * h + 4 * i + 3 * (q + kv))
                                            + keys * (4 * kv + (2 * q if math_sdpa else 0)))
                                      + 4 * h * t + 3 * h * qt + 2 * h * slots)
    # The [B, Q, T + Q] bool mask (block_mask, built from the [B, N, T] context visibility) and
    # the float copy of it that every layer's SDPA makes and keeps for backward: 1 + act x layers
    # bytes per element, fitted to the measured CPU peaks (bench/results/memory_estimate_dflash*.json;
    # the CPU's fused kernel takes the mask with GQA in torch 2.13: no scores). On CUDA the kernels
    # that take a mask do not take GQA (flash: no mask; efficient: no GQA), so a GQA draft falls
    # back to the math path, whose float32 scores [B, heads, Q, T + Q] are held once per layer
    # plus about two more in flight (the CPU's math path: bench/results/dflash_sdpa_memory.json).
    attn = b * qt * keys * (1 + act * nl) + 3 * b * n * t
    if math_sdpa:
        attn += (nl + 2) * b * dims.num_heads * qt * keys * 4
    parts["attention (blocks x row)"] = int(attn)
    return MemoryEstimate(parts)


def available_bytes(device: str) -> tuple[int, str]:
    """(bytes free, what was measured) on the training device: RAM for the CPU, the GPU's free memory."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free memory of GPU {torch.cuda.current_device()}"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM"


def read_verifier_dims(name_or_path: str) -> VerifierDims | None:
    """Dims from a local model's config.json (None for hub ids or unreadable configs: no check)."""
    path = Path(name_or_path).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        return VerifierDims.from_config(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        return None


EAGLE3_ADVICE = ("lower the sequence length (memory grows with its square on the CPU), TTT steps or rows per "
                 "batch, or train on a larger machine")


def dflash_advice(cfg: Any) -> str:
    """What to lower for a DFlash run, in its terms (block = --ttt-steps + 1, --dflash-num-anchors)."""
    return (f"lower the block size (--ttt-steps {cfg.ttt_steps}: blocks of {cfg.ttt_steps + 1} tokens), the blocks "
            f"per row (--dflash-num-anchors {cfg.dflash_num_anchors or 'all'}), the sequence length or rows per "
            "batch (attention grows with blocks x block size x (sequence length + blocks x block size)), "
            "or train on a larger machine")


def refusal(estimate: MemoryEstimate, free: int, where: str, flag: str, value: int,
            advice: str = EAGLE3_ADVICE) -> str | None:
    """The message when the run cannot fit, else None."""
    if estimate.total <= free:
        return None
    return f"{flag} {value}: the trainer would need {estimate.describe()}, but the {where} is {gib(free)}; {advice}"


def train_memory_estimate(cfg: Any, dims: VerifierDims, device: str,
                          num_aux_layers: int | None = None) -> MemoryEstimate:
    """The estimate for a TrainConfig on `device` (resolved, not "auto"), with the precision and
    attention the trainer picks there for "auto", by the config's algorithm (EAGLE-3 or DFlash);
    `num_aux_layers` defaults to the config's --vllm-layer-ids, else the default three."""
    on_gpu = device.startswith("cuda")
    if num_aux_layers is None:
        num_aux_layers = len(cfg.vllm_layer_ids) - 1 if cfg.vllm_layer_ids else 3
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    if cfg.algorithm == "dflash":
        return estimate_dflash_train_memory(
            dims, total_seq_len=cfg.total_seq_len, block_size=cfg.ttt_steps + 1, num_anchors=cfg.dflash_num_anchors,
            num_layers=cfg.num_layers, draft_vocab_size=cfg.draft_vocab_size, rows_per_batch=cfg.rows_per_batch,
            num_aux_layers=num_aux_layers, on_gpu=on_gpu, bf16=bf16, loss_impl=cfg.loss_impl,
            freeze_lm_head=cfg.freeze_lm_head)
    return estimate_train_memory(
        dims, total_seq_len=cfg.total_seq_len, ttt_steps=cfg.ttt_steps, num_layers=cfg.num_layers,
        draft_vocab_size=cfg.draft_vocab_size, rows_per_batch=cfg.rows_per_batch, num_aux_layers=num_aux_layers,
        on_gpu=on_gpu, bf16=bf16,
        flex=cfg.attn_impl == "flex" or (cfg.attn_impl == "auto" and on_gpu), loss_impl=cfg.loss_impl,
        freeze_lm_head=cfg.freeze_lm_head,
    )


def check_train_memory(cfg: Any, *, device: str | None = None, dims: VerifierDims | None = None,
                       free: int | None = None, num_aux_layers: int | None = None,
                       label: str = "--total-seq-len") -> MemoryEstimate | None:
    """Refuse a TrainConfig that cannot fit (UserError with the estimate, naming `label`); the
    estimate, or None when the verifier's shapes are unknown (a hub id: no check).

    `device` defaults to the config's (resolved); `dims` to the verifier's config.json; `free`
    to what `available_bytes` measures there. The trainer checks its flags with it before it
    starts, the dashboard a run's settings before it stores the run.
    """
    dims = dims or read_verifier_dims(cfg.verifier_name_or_path)
    if dims is None:
        return None
    device = resolve_device(device or cfg.device)
    est = train_memory_estimate(cfg, dims, device, num_aux_layers)
    if free is None:
        free, where = available_bytes(device)
    else:
        where = "free GPU memory" if device.startswith("cuda") else "available RAM"
    if cfg.algorithm == "dflash":
        flag = f"--algorithm dflash, {label}" if label.startswith("--") else f"DFlash, {label}"
        message = refusal(est, free, where, flag, cfg.total_seq_len, dflash_advice(cfg))
    else:
        message = refusal(est, free, where, label, cfg.total_seq_len)
    if message:
        raise UserError(message)
    return est
