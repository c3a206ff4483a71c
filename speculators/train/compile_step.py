"""`--compile`: torch.compile of the parts of the EAGLE-3 draft step that Inductor can fuse.

Compiled: each draft decoder layer's forward (its TTT attention over the step's keys, the
RMSNorms, RoPE, the MLP's activation and the residual adds), and the fused loss's per-chunk
KL (`lm_head_kl.compiled_chunk_kl`). The matmuls stay ATen/oneDNN calls either way, so the
gain is the fused elementwise work: bench/ab_compile.py measured 1.1x (process CPU time, every
pair) on the 8B-shaped fp32 step on the CPU, and no gain under bf16 autocast (docs/benchmarks.md).
Shapes are dynamic (the counted-rows unroll's row count changes every batch), so one graph
per TTT step serves every batch after the first step's compile (about 1-3 minutes on 2 cores;
Inductor caches it on disk for the next run).

`nn.Module.compile` compiles in place: parameter names, checkpoints and the acceptance probe
(a separate, eager draft) are unchanged.
"""

from __future__ import annotations

import torch


def compile_refusal(algorithm: str, world_size: int, uses_flex: bool, gradient_checkpointing: bool) -> str | None:
    """Why `--compile` cannot run with these settings (None: it can): only the measured and
    tested path is allowed."""
    if algorithm != "eagle3":
        return "--compile applies to --algorithm eagle3 only; drop --compile"
    if world_size > 1:
        return ("--compile runs in one process only (not tested with FSDP2 sharding across ranks); "
                "drop --compile under torchrun")
    if uses_flex:
        return ("--compile compiles the SDPA attention path; flex attention (the CUDA default) is compiled "
                "already: pass --attn-impl sdpa with --compile, or drop --compile")
    if gradient_checkpointing:
        return "--compile with --gradient-checkpointing is not supported (not tested together); drop one of them"
    return None


def compile_step(objective: torch.nn.Module) -> None:
    """Compile the objective's draft layers and fused loss in place (`build_components` has
    refused the settings `compile_refusal` names before anything was built)."""
    for layer in objective.draft.layers:
        layer.compile(dynamic=True)
    objective.compile_loss = True
