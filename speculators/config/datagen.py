"""`speculators datagen`'s settings (offline hidden states), once.

`DatagenConfig` is what `speculators.datagen.runner.run_datagen` reads; the command's flags,
the pipeline's datagen stage (`speculators.config.stages`) and the dashboard's `batch_size`
field derive from it.
"""

from __future__ import annotations

from typing import Literal

from speculators.config.base import TypedSettings, setting

VLLM = "vllm backend"


PREPARE = "data preparation (when --train-data-path is not a prepare-data output)"


class DatagenConfig(TypedSettings):
    target_model_path: str = setting(help="verifier model dir or HF id", min_length=1)
    train_data_path: str | list[str] = setting(
        help="repeatable. A prepare-data output directory, or what prepare-data's --data takes (sharegpt | "
             "ultrachat | PATH.jsonl | PATH.json | DATASET_DIR | HF id[:split], options after commas): then it is "
             "prepared first with the verifier's chat template and cached under --cache-dir", repeat=True)
    output_dir: str = setting(help="where hidden states are written", min_length=1)
    seq_length: int | None = setting(None, "truncate each sample to this many tokens when preparing (default "
                                     "2048); with a prepared directory it must match the one it was made with",
                                     group=PREPARE, ge=2)
    seed: int = setting(0, "shuffle seed applied before --max-samples when preparing", group=PREPARE, ge=0)
    cache_dir: str | None = setting(None, "where prepared copies are kept, one per fingerprint of tokenizer, chat "
                                    "template, sources and parameters, so a rerun does not tokenize again "
                                    "(default $SPECULATORS_CACHE/prepared, i.e. ~/.cache/speculators/prepared)",
                                    group=PREPARE)
    token_freq_path: str | None = setting(None, "also write the token frequencies here, e.g. ./token_freq.pt where "
                                          "the public scripts put them (they are always written to "
                                          "--output-dir/token_freq.pt, beside data_config.json); an existing file "
                                          "with other counts is refused, never overwritten")
    layer_ids: list[int] | None = setting(None, "verifier layer ids to save (default: 2, n//2, n-3 and the final "
                                          "layer n)")
    include_last_layer: bool = setting(True, "append the final layer n to --layer-ids when it is missing")
    batch_size: int = setting(8, "samples per forward pass", title="Datagen batch size", ge=1, le=4096)
    max_samples: int | None = setting(None, "only the first N prepared samples (when preparing: prepare at most "
                                      "N)", ge=1)
    backend: Literal["transformers", "vllm"] = setting("transformers", "engine that computes the hidden states")
    format: Literal["pt", "safetensors"] = setting(
        "pt", "pt: one file per sample (format v1); safetensors: sharded, faster to load")
    hidden_states_dtype: Literal["bf16", "fp8"] = setting(
        "bf16", "how hidden states are stored: bf16 (as computed), or fp8 = float8 e4m3 with one float32 scale per "
        "token and layer (about half the bytes; read back as bf16; see docs/data-pipeline.md)")
    device: str = setting("auto", "transformers backend: cpu, cuda, cuda:N or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "compute dtype (auto: bf16 on GPU, fp32 on CPU); stored states are bf16 or fp8, see "
        "--hidden-states-dtype")
    tensor_parallel_size: int = setting(1, "vllm backend only", group=VLLM, ge=1)
    gpu_memory_utilization: float = setting(0.9, "vllm backend only", group=VLLM, gt=0.0, le=1.0)
    max_model_len: int | None = setting(None, "vllm backend only", group=VLLM, ge=1)
    extra_args: list[str] = setting([], "arguments after a bare -- (vLLM engine args)", cli=False)

    def sources(self) -> list[str]:
        return [self.train_data_path] if isinstance(self.train_data_path, str) else list(self.train_data_path)
