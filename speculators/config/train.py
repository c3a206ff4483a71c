"""The trainer's settings: every `speculators train` flag, its default, help and bounds.

`TrainConfig` is what the trainer reads; `speculators train`'s flags are derived from it
(`speculators.train.cli`), and so are the flags the dashboard's worker passes
(`speculators.config.stages`). Flag names follow the public speculators training script.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from speculators.config.base import TypedSettings, setting

MODEL, DATA, ONLINE, TRAINING, OUTPUT = "model", "data", "online training (hidden states from a vLLM server)", \
    "training", "output"
ACCEPTANCE = "acceptance during training"

TTT_STEPS_MAX = 16
SEQ_LEN_MIN, SEQ_LEN_MAX = 16, 1 << 20


class TrainConfig(TypedSettings):
    # ---------------------------------------------------------------- model
    verifier_name_or_path: str = setting(help="verifier (target) model directory or HF id", group=MODEL,
                                         title="Verifier model", min_length=1)
    num_layers: int = setting(1, "draft decoder layers", group=MODEL, title="Draft layers", ge=1, le=16)
    draft_vocab_size: int | None = setting(None, "draft vocabulary size; must match d2t/t2d", group=MODEL,
                                           title="Draft vocabulary size", ge=2)
    d2t_path: str | None = setting(None, "d2t.npy (default: <data-path>/d2t.npy if present)", group=MODEL)
    t2d_path: str | None = setting(None, "t2d.npy (default: <data-path>/t2d.npy if present)", group=MODEL)
    from_pretrained: str | None = setting(None, "initialise the draft from this checkpoint directory", group=MODEL)
    norm_before_residual: bool = setting(True, "layer 0 keeps the normed hidden state as its residual", group=MODEL)
    draft_arch: Literal["llama", "qwen3"] = setting(
        "llama", "draft decoder layer style: llama, or qwen3 (per-head q/k RMSNorm)", group=MODEL)
    norm_before_fc: bool = setting(
        False, "EAGLE-3.1: one RMSNorm over the concatenated aux hidden states before fc", group=MODEL)
    fc_norm: bool = setting(
        False, "EAGLE-3.1: one RMSNorm per aux hidden state before fc; excludes --norm-before-fc", group=MODEL)
    norm_output: bool = setting(
        False, "EAGLE-3.1: feed the post-norm hidden state to the next TTT/drafting step", group=MODEL)
    sliding_window: int | None = setting(
        None, "sliding-window attention of this many tokens in every draft layer (default: full attention)",
        group=MODEL, ge=1)
    full_attention_indices: list[int] | None = setting(
        None, "with --sliding-window: draft layers that keep full attention (such a draft cannot be served "
        "by vLLM, which needs one attention kind for all draft layers)", group=MODEL)

    algorithm: Literal["eagle3", "dflash"] = setting(
        "eagle3", "draft algorithm: eagle3 (chained drafting, TTT) or dflash (block-parallel drafting: one draft "
        "forward proposes --ttt-steps tokens from a block of the verifier's newest token plus --ttt-steps mask "
        "tokens; served by vLLM's method dflash)", group=MODEL, title="Draft algorithm")
    mask_token_id: int | None = setting(
        None, "dflash: the token id fed at the block's masked slots (its embedding is the verifier's, frozen; "
        "default: the verifier's last vocabulary id)", group=MODEL, ge=0)
    dflash_num_anchors: int = setting(
        512, "dflash: blocks trained per packed row, anchored at random counted positions (0: every counted "
        "position)", group=MODEL, ge=0)

    # ---------------------------------------------------------------- data
    data_path: str | None = setting(None, "hidden states written by `speculators datagen`", group=DATA)
    total_seq_len: int = setting(8192, "tokens per packed row", group=DATA, title="Sequence length",
                                 ge=SEQ_LEN_MIN, le=SEQ_LEN_MAX)
    rows_per_batch: int = setting(1, "packed rows per process per step", group=DATA, ge=1, le=4096)
    batches_per_step: int | None = setting(None, "packed batches per optimizer step over all processes "
                                           "(default: world size)", group=DATA, ge=1)
    train_data_ratio: float = setting(0.9, "training fraction; the rest validates", group=DATA, gt=0.0, le=1.0)
    on_corrupt: Literal["skip", "raise"] = setting("skip", "a corrupt sample file: skip it with a warning "
                                                   "naming it, or stop", group=DATA)
    data_format_version: Literal[0, 1] = setting(
        1, "layout of the data_<i>.pt files: 1 = what datagen writes (a list of hidden_states, the final layer "
        "last); 0 = the older layout (hidden_state = the aux layers concatenated, target = the final layer), kept "
        "for backwards compatibility; a file in the other layout is refused naming it and its keys", group=DATA)
    data_source: str | None = setting(None, "sample store to use (default: disk, or online if --vllm-endpoint "
                                      "is set)", group=DATA)

    # ---------------------------------------------------------------- online
    vllm_endpoint: str | None = setting(None, "URL of a `speculators launch-vllm` server (e.g. "
                                        "http://localhost:8000); enables online/hybrid training. Several servers "
                                        "of the same verifier: repeat the flag or separate URLs with commas "
                                        "(requests go to the least-loaded live one)", group=ONLINE, repeat=True)
    on_missing: Literal["generate", "skip", "raise"] = setting(
        "generate", "sample without hidden states on disk: request it (generate), leave it out (skip) or stop "
        "before training (raise)", group=ONLINE)
    on_generate: Literal["delete", "cache"] = setting(
        "delete", "after using a requested sample: delete it, or cache it as data_<i>.pt in --hidden-states-path "
        "for later epochs (hybrid)", group=ONLINE)
    hidden_states_path: str | None = setting(None, "directory of cached samples (datagen format, data_<i>.pt); "
                                             "read first, written by --on-generate cache", group=ONLINE)
    prepared_data: str | None = setting(None, "prepared dataset (prepare-data --output) whose rows are requested; "
                                        "default: --data-path when it is a prepared dataset", group=ONLINE)
    prefetch: int = setting(16, "samples requested ahead of the trainer", group=ONLINE, ge=0)
    vllm_workers: int = setting(4, "concurrent requests", group=ONLINE, ge=1)
    vllm_model: str | None = setting(None, "served model id (default: the server's only model)", group=ONLINE)
    vllm_timeout: float = setting(120.0, "seconds per request", group=ONLINE, gt=0)
    vllm_max_wait: float = setting(300.0, "seconds to keep retrying a down or restarting server before failing",
                                   group=ONLINE, ge=0)
    vllm_layer_ids: list[int] | None = setting(None, "vLLM layer ids the server exports (launch-vllm prints "
                                               "them); checked against every response and recorded with cached "
                                               "samples", group=ONLINE)
    hidden_states_dtype: Literal["bf16", "fp8"] | None = setting(
        None, "how --on-generate cache stores samples: bf16, or fp8 (e4m3, one scale per token and layer; half "
        "the bytes, read back as bf16); default: what the cache's data_config.json records, else bf16",
        group=ONLINE)

    # ---------------------------------------------------------------- training
    epochs: int = setting(20, "passes over the training split", group=TRAINING, title="Epochs", ge=1, le=1000)
    lr: float = setting(1e-4, "peak learning rate", group=TRAINING, title="Learning rate", gt=0.0, le=1.0)
    weight_decay: float = setting(0.01, "AdamW weight decay", group=TRAINING, ge=0.0)
    scheduler: Literal["cosine", "linear", "none"] = setting("cosine", "decay after warmup", group=TRAINING)
    warmup_steps: int | None = setting(None, "default: --warmup-ratio of all steps", group=TRAINING, ge=0)
    warmup_ratio: float = setting(0.05, "warmup fraction of all steps", group=TRAINING, ge=0.0, le=1.0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", group=TRAINING, ge=0.0)
    ttt_steps: int = setting(3, "times the draft is unrolled per position", group=TRAINING, title="TTT steps",
                             ge=1, le=TTT_STEPS_MAX)
    ttt_step_loss_decay: float = setting(1.0, "loss weight of step k is decay**k", group=TRAINING, ge=0.0)
    seed: int = setting(0, "seed of data order and initialisation", group=TRAINING, title="Seed",
                        ge=0, le=2**31 - 1)
    max_steps: int | None = setting(None, "stop after this many optimizer steps in all and checkpoint that step",
                                   group=TRAINING, ge=1)
    device: str = setting("auto", "auto, cpu, cuda", group=TRAINING)
    attn_impl: Literal["auto", "sdpa", "flex"] = setting(
        "auto", "TTT attention: flex (CUDA default) or masked SDPA (CPU default)", group=TRAINING)
    precision: Literal["auto", "bf16", "fp32"] = setting(
        "auto", "auto: bf16 autocast on CUDA, fp32 on CPU; bf16 also autocasts on the CPU (about 2x faster for "
        "drafts of hidden size >= 1024 on CPUs with bf16 matmuls)", group=TRAINING)
    optimizer_impl: Literal["auto", "fused", "foreach"] = setting(
        "auto", "AdamW kernel: auto = fused in one process (4x faster step on the CPU), foreach under "
        "torchrun/FSDP2", group=TRAINING)
    loss_impl: Literal["fused", "chunked", "eager"] = setting(
        "fused", "draft lm_head + KL: fused keeps only the logits for backward; chunked keeps no [tokens, vocab] "
        "tensor and recomputes logits in backward (for very long rows); eager is plain autograd (2-4x fused's "
        "memory)", group=TRAINING)
    loss_chunk_rows: int = setting(0, "rows per chunk of the fused/chunked loss (bounds its float32 temporaries); "
                                   "0 = automatic: about 1M elements per chunk on the CPU, 32M on GPUs",
                                   group=TRAINING, ge=0)
    sync_every_steps: int | None = setting(
        None, "bring the step metrics to the host (train records, console lines) and agree on a stop signal across "
        "ranks every N optimizer steps instead of every step, so the accelerator is never waited on in between "
        "(default: 1 on the CPU, 16 on CUDA); losses and checkpoints do not depend on it", group=TRAINING, ge=1)
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw", "adamw, or muon: torch.optim.Muon for the draft's hidden weight matrices (fc, attention, MLP) and "
        "AdamW for the rest (lm_head, norms); see docs/training.md", group=TRAINING, title="Optimizer")
    muon_lr: float | None = setting(None, "peak learning rate of the Muon matrices (default: --lr; Muon's update "
                                    "is RMS-matched to AdamW's, see --muon-adjust-lr)", group=TRAINING, gt=0.0, le=1.0)
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum", group=TRAINING, ge=0.0, lt=1.0)
    muon_adjust_lr: Literal["match_rms_adamw", "original"] = setting(
        "match_rms_adamw", "Muon's per-matrix lr scale: match_rms_adamw (0.2 sqrt(max(A, B)), so AdamW's lr and weight "
        "decay carry over) or original (sqrt(max(1, A/B)))", group=TRAINING)
    loss: Literal["kl", "reverse_kl", "jsd", "tv", "lk"] = setting(
        "kl", "training loss between the verifier's and the draft's next-token distributions: kl = KL(verifier || "
        "draft), reverse_kl, jsd (Jensen-Shannon), tv (total variation), lk (KL/TV blend weighted by the acceptance "
        "probability); formulas in docs/training.md", group=TRAINING, title="Loss")
    lk_eta: float = setting(3.0, "--loss lk: the KL weight is exp(-lk_eta * acceptance probability) per position",
                            group=TRAINING, ge=0.0)
    gradient_checkpointing: bool = setting(
        False, "recompute each draft layer's activations in backward instead of keeping them (less memory for "
        "long rows and many TTT steps, about one more forward of the layers per step)", group=TRAINING)
    freeze_lm_head: bool = setting(
        False, "keep the draft's lm_head at its starting weights, as the public speculators trainer does: the "
        "verifier's lm_head rows of the draft vocabulary (a --from-pretrained or resumed draft: the checkpoint's); "
        "saves the lm_head's gradient and AdamW state (12 x hidden x draft-vocab bytes) and its weight-gradient "
        "matmul per step; checkpoints still hold lm_head (vLLM loads it). Default: trained (the EAGLE-3 recipe)",
        group=TRAINING, title="Freeze lm_head")
    num_workers: int | None = setting(None, "DataLoader worker processes that load the next steps' hidden states "
                                      "while the accelerator computes (default: 4 on CUDA with on-disk data, "
                                      "else 0)", group=TRAINING, ge=0)

    # ---------------------------------------------------------------- acceptance
    eval_every_steps: int = setting(
        0, "also measure acceptance every N optimizer steps (0: only at epoch ends); each measurement is exact "
        "speculative decoding of the current draft with the verifier on the run's fixed held-out prompts",
        group=ACCEPTANCE, ge=0)
    eval_prompts: int = setting(
        8, "held-out prompts the acceptance is measured on (0: no acceptance measurement)", group=ACCEPTANCE,
        ge=0, le=4096)
    eval_max_tokens: int = setting(32, "tokens generated per prompt when measuring acceptance", group=ACCEPTANCE,
                                   ge=1, le=65536)
    eval_data: str | None = setting(
        None, "held-out prompts: a prepared dataset, a hidden-state directory, a prompt set (a .jsonl of "
        "{\"prompt\": ..., \"category\": ...} lines) or a conversation source as prepare-data takes it "
        "(default: the validation rows of the training data)", group=ACCEPTANCE)
    best_by: Literal["val-loss", "acceptance"] = setting(
        "val-loss", "the score checkpoint_best is chosen by: validation loss (lower is better; the training loss "
        "without a validation split) or acceptance (mean acceptance length at the epoch end, higher is better)",
        group=ACCEPTANCE)

    # ---------------------------------------------------------------- output
    save_path: str = setting("./output/checkpoints", "checkpoint directory", group=OUTPUT)
    resume: bool = setting(True, "start fresh; refuses a save path that holds checkpoints", group=OUTPUT,
                           flag="--no-resume-from-checkpoint", negate=True)
    checkpoint_every_steps: int = setting(0, "also save a checkpoint every N optimizer steps (0: only at epoch "
                                          "ends)", group=OUTPUT, ge=0)
    keep_last_checkpoints: int = setting(0, "keep the K newest step/epoch checkpoints, never the best "
                                         "(0: keep all)", group=OUTPUT, ge=0)
    logger: Literal["trackio", "wandb", "tensorboard"] | None = setting(None, "experiment tracker", group=OUTPUT)
    log_dir: str = setting("./logs", "experiment tracker directory", group=OUTPUT)
    run_name: str | None = setting(None, "run name for the tracker (default: the save path's name)", group=OUTPUT)
    log_freq: int = setting(1, "console line every N steps", group=OUTPUT, ge=1)
    metrics_file: str | None = setting(None, "JSONL metrics stream (default <save-path>/metrics.jsonl)",
                                       group=OUTPUT)

    @field_validator("vllm_endpoint", mode="before")
    @classmethod
    def _endpoints(cls, value: Any) -> Any:
        """The repeated flag (a list) or a --config list: one comma-separated string, so every
        reader of this field keeps seeing a str (`vllm_endpoints` gives the URLs)."""
        if isinstance(value, (list, tuple)):
            parts = [p.strip() for item in value for p in str(item).split(",") if p.strip()]
            return ",".join(parts) or None
        return value

    @property
    def vllm_endpoints(self) -> list[str]:
        """The URLs of `vllm_endpoint`, in order."""
        return [p.strip() for p in (self.vllm_endpoint or "").split(",") if p.strip()]

    @property
    def online(self) -> bool:
        """Hidden states come from a vLLM server (online/hybrid) rather than datagen's files."""
        return bool(self.vllm_endpoint)

    def option_conflicts(self) -> dict[str, str]:
        """{field: message} for settings that are valid alone but not together (the trainer refuses
        them before it starts; the dashboard's form shows them beside the field)."""
        conflicts: dict[str, str] = {}
        if self.algorithm == "dflash":
            if self.loss != "kl":
                conflicts["loss"] = "--algorithm dflash trains with --loss kl (the other losses are EAGLE-3's so far)"
            if self.gradient_checkpointing:
                conflicts["gradient_checkpointing"] = ("--algorithm dflash trains without --gradient-checkpointing "
                                                       "(an EAGLE-3 option so far)")
        elif self.mask_token_id is not None:
            conflicts["mask_token_id"] = ("--mask-token-id applies to --algorithm dflash only; drop it or pass "
                                          "--algorithm dflash")
        return conflicts


ONLINE_FIELDS = [n for n, f in TrainConfig.model_fields.items() if (f.json_schema_extra or {}).get("group") == ONLINE]
