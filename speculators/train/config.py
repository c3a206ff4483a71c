"""Training configuration (one dataclass; the CLI maps flags onto it one to one)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    verifier_name_or_path: str
    data_path: str | None = None
    save_path: str = "./output/checkpoints"
    epochs: int = 20
    lr: float = 1e-4
    resume: bool = True
    logger: str | None = None
    total_seq_len: int = 8192
    log_dir: str = "./logs"
    run_name: str | None = None
    num_layers: int = 1
    d2t_path: str | None = None
    t2d_path: str | None = None
    ttt_steps: int = 3
    ttt_step_loss_decay: float = 1.0
    draft_vocab_size: int | None = None
    from_pretrained: str | None = None
    # optimisation
    weight_decay: float = 0.01
    scheduler: str = "cosine"  # cosine | linear | none
    warmup_steps: int | None = None
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    rows_per_batch: int = 1  # packed rows of total_seq_len per rank per step
    batches_per_step: int | None = None  # packed batches per optimizer step, all ranks (default: world size)
    train_data_ratio: float = 0.9
    seed: int = 0
    norm_before_residual: bool = True
    draft_arch: str = "llama"  # llama | qwen3 draft layers
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    sliding_window: int | None = None
    full_attention_indices: list[int] | None = None
    # runtime
    device: str = "auto"
    attn_impl: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; bf16 / fp32 force it
    optimizer_impl: str = "auto"  # auto: fused AdamW in one process, foreach under FSDP
    loss_impl: str = "fused"  # fused | chunked | eager (speculators.train.lm_head_kl)
    loss_chunk_rows: int = 0  # rows per chunk of the fused/chunked loss; 0 = automatic
    num_workers: int = 0
    log_freq: int = 1
    max_steps: int | None = None
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps; 0 = only at epoch ends
    keep_last_checkpoints: int = 0  # delete all but the newest K checkpoints (never the best); 0 = keep all
    metrics_file: str | None = None
    on_corrupt: str = "skip"
    data_source: str | None = None
    # flags owned by other parts (online mode: --vllm-endpoint, --on-missing, ...), passed through
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
