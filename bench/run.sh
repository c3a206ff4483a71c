#!/usr/bin/env bash
# Run the benchmarks and print one table (also written to bench/results/summary.md).
#
#   bench/run.sh            # CPU set, sized for a 2-core machine (~15-25 min)
#   bench/run.sh --full     # adds the Llama-3.1-8B-shaped draft on the CPU (~10 GB RAM, slow)
#   bench/run.sh --gpu      # GPU set (one run, sized for <= 8 min on one H100/H200): CUDA checks
#                           # (flex attention fwd+bwd, FSDP2 bf16 over NCCL), the Llama-3.1-8B shape
#                           # in bf16 at seq 2048 (1 and 4 rows per step) and 8192 with MFU, CUDA
#                           # memory and profiler traces, and the public trainer unmodified beside
#                           # ours (their defaults: flex attention, fused loss, 12 loader workers);
#                           # ends with bench/gpu_targets.py. Needs the public package: online, or
#                           # carried as bench/public-wheels.tar.xz (bench/pack_public_wheels.sh).
#                           # lmhead, optim, dataload, datagen, eager: on the GPU only with --only
#   bench/run.sh --only train,dataload   # any of: checks dataload datagen train sbs lmhead optim regen
#   (regen, regeneration tokens/s with vLLM CPU and transformers, runs only when asked: it starts a
#   vLLM server, about 2 minutes on 2 cores)
#
# Results: bench/results/<name>.json (machine facts, load average, versions, git commit
# in each) and summary.md. Timings on a shared machine are noisy: each JSON keeps every
# repeat, and the summary says which machine and load they came from.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
MODE=cpu
ONLY="checks,dataload,datagen,train,sbs,lmhead,optim"
ONLY_SET=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --full) MODE=full ;;
    --gpu) MODE=gpu ;;
    --only) ONLY="$2"; ONLY_SET=1; shift ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }
if [[ $MODE == gpu ]]; then
  [[ -n $ONLY_SET ]] || ONLY="checks,train,sbs"
  # The lent GPU machine has no package index: install the public package from carried wheels.
  if [[ -f "$HERE/public-wheels.tar.xz" || -d "$HERE/public-wheels" ]]; then export PUBLIC_OFFLINE=1; fi
  # BENCH_GPU_SHAPE/BENCH_GPU_SEQS let tests/test_bench_smoke.py run this path on a CPU, tiny.
  GSHAPE="${BENCH_GPU_SHAPE:-llama8b}"
  read -r GSEQ1 GSEQ2 GSTEPS <<< "${BENCH_GPU_SEQS:-2048 8192 20}"
fi
SECONDS=0
section() { echo "[run.sh] $1 at ${SECONDS}s"; }
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
echo "machine: nproc=$(nproc) load=$(cut -d' ' -f1-3 /proc/loadavg) mode=$MODE python=$PY"

if want checks && [[ $MODE == gpu ]]; then
  section checks
  # correctness on CUDA first: a failed check is reported, the timings still run
  "$PY" bench/gpu_checks.py --name gpu_checks || echo "gpu_checks: FAILED (see bench/results/gpu_checks.json)"
fi
if want dataload; then
  # Realistic per-sample size (H=4096 x 4 layers bf16, 2048 tokens = 64 MiB/sample), few samples,
  # and a smaller hidden size with more samples.
  "$PY" bench/bench_dataload.py --hidden 4096 --seq-len 2048 --samples 4 --repeats 3 --name dataload_h4096_l2048
  "$PY" bench/bench_dataload.py --hidden 1024 --seq-len 2048 --samples 24 --repeats 3 --name dataload_h1024_l2048
fi
if want datagen; then
  if [[ $MODE == gpu ]] && "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" bench/bench_datagen.py --models small --samples 64 --seq-len 2048 --batch-size 16 --dtypes bfloat16 --backend vllm --name datagen_vllm
  fi
  if [[ $MODE == gpu ]]; then
    "$PY" bench/bench_datagen.py --models small --samples 64 --seq-len 2048 --batch-size 16 --dtypes bfloat16 --name datagen_gpu
  else
    "$PY" bench/bench_datagen.py --models tiny,small --samples 8 --seq-len 512 --batch-size 4 --repeats 2 --name datagen
  fi
fi
if want train; then
  case $MODE in
    cpu)  "$PY" bench/bench_train.py --shapes tiny,small --steps 3 --warmup 1 --profile 2 --name train_cpu
          "$PY" bench/bench_train.py --shapes small --steps 3 --warmup 1 --profile 2 --opt --name train_cpu_opt ;;
    full) "$PY" bench/bench_train.py --shapes tiny,small,llama8b --steps 2 --warmup 1 --profile 2 --name train_cpu
          "$PY" bench/bench_train.py --shapes small,llama8b --steps 2 --warmup 1 --profile 2 --opt --name train_cpu_opt ;;
    # bf16 autocast with fp32 master weights: what the trainer does on CUDA (--precision auto);
    # host syncs every 8 steps (the trainer's --sync-every-steps), profiler traces kept
    gpu)  section train
          "$PY" bench/bench_train.py --shapes "$GSHAPE" --seq-len "$GSEQ1" --steps "$GSTEPS" --warmup 3 --profile 4 --trace --precision bf16 --name train_gpu_2048
          # several rows per step: the same 2048-token rows, four to a step
          "$PY" bench/bench_train.py --shapes "$GSHAPE" --seq-len "$GSEQ1" --rows 4 --steps $(( GSTEPS / 2 )) --warmup 3 --profile 0 --precision bf16 --name train_gpu_2048x4
          "$PY" bench/bench_train.py --shapes "$GSHAPE" --seq-len "$GSEQ2" --steps $(( GSTEPS / 2 )) --warmup 3 --profile 4 --trace --precision bf16 --name train_gpu_8192 ;;
  esac
fi
if want eager && [[ $MODE == gpu ]]; then
  # before/after of the fused lm_head + KL where memory matters most
  "$PY" bench/bench_train.py --shapes llama8b --seq-len 8192 --steps 10 --warmup 3 --profile 0 --precision bf16 --loss-impl eager --name train_gpu_8192_eager
fi
if want sbs; then
  case $MODE in
    cpu|full)
      "$PY" bench/side_by_side.py --shape tiny --steps 20 --repeats 2 --variants ours,public,public-fp32
      "$PY" bench/side_by_side.py --shape small --steps 8 --warmup 2 --repeats 2 \
        --variants ours,ours-eager,ours-bf16,ours-bf16-eager,public,public-fp32 ;;&
    full)
      "$PY" bench/side_by_side.py --shape llama8b --steps 3 --warmup 1 --repeats 1 \
        --variants ours,ours-bf16,public,public-fp32 ;;
    gpu)
      section sbs
      # their trainer unmodified (CUDA torch of the machine + the carried wheels), same data and steps
      "$PY" bench/side_by_side.py --shape "$GSHAPE" --seq-len "$GSEQ1" --steps "$GSTEPS" --warmup 3 --repeats 2 --variants ours,public --name side_by_side_llama8b_gpu ;;
  esac
fi
if want lmhead; then
  if [[ $MODE == gpu ]]; then
    "$PY" bench/bench_lmhead_kl.py --cases llama8b:2048,llama8b:8192 --precisions bf16 --repeats 5 --name lmhead_kl_gpu
  else
    "$PY" bench/bench_lmhead_kl.py --cases llama8b:2048,small:4096 --precisions fp32,bf16 --repeats 2 \
      --objective-cases small:2048
  fi
fi
if want optim; then
  "$PY" bench/bench_optimizer.py --shape llama8b --scale $([[ $MODE == gpu ]] && echo 1 || echo 2)
fi
if want regen; then
  "$PY" bench/bench_regenerate.py --samples 32 --max-tokens 64 --concurrency 32
fi
"$PY" bench/table.py
if [[ $MODE == gpu ]]; then
  section targets
  "$PY" bench/gpu_targets.py
fi
