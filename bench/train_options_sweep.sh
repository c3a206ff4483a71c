#!/usr/bin/env bash
# Acceptance of optimizer x loss x EAGLE-3.1 norms on the demo's data (docs/benchmarks.md, "Training options").
# usage: bench/train_options_sweep.sh DEMO_WORKDIR OUT_DIR [JOBS] [NAME:SEED:FLAGS ...]
# DEMO_WORKDIR is a finished `speculators demo --workdir` (read only). Each run is the demo's own train
# command (4 epochs, lr 3e-3, 512-token rows) plus FLAGS and --seed, without acceptance while training,
# then the demo's `speculators eval` of checkpoint_best (16 held-out ShareGPT prompts, K = 3).
# One line per run is appended to OUT_DIR/results.tsv: name seed acceptance train_s eval_s.
set -euo pipefail
demo=$(realpath "$1"); out=$(realpath -m "$2"); jobs=${3:-1}; shift 3 || shift $#
mkdir -p "$out"
one() {
  local spec=$1 name seed flags save t0 t1 t2
  name=${spec%%:*}; seed=${spec#*:}; seed=${seed%%:*}; flags=${spec#*:*:}; flags=${flags//\*/ }
  save="$out/$name-s$seed"
  rm -rf "$save"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  python -m speculators train --verifier-name-or-path="$demo/verifier" --draft-vocab-size=256 \
    --d2t-path="$demo/vocab/d2t.npy" --t2d-path="$demo/vocab/t2d.npy" --data-path="$demo/hidden_states" \
    --total-seq-len=512 --epochs=4 --lr=0.003 --save-path="$save/checkpoints" --run-name="$name-s$seed" \
    --eval-prompts 0 --seed "$seed" $flags > "$save.train.log" 2>&1
  t1=$(date +%s)
  python -m speculators eval --checkpoint "$save/checkpoints/checkpoint_best" --verifier "$demo/verifier" \
    --data sharegpt --num-speculative-tokens 3 --num-prompts 16 --skip-samples 256 --data-seed 0 \
    --seq-length 256 --output-json "$save/eval.json" > "$save.eval.log" 2>&1
  t2=$(date +%s)
  acc=$(python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d.get('acceptance_length', d.get('mean_acceptance_length')))" "$save/eval.json")
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$seed" "$acc" $((t1 - t0)) $((t2 - t1)) >> "$out/results.tsv"
}
export -f one; export demo out
printf '%s\n' "$@" | xargs -P "$jobs" -I{} bash -c 'one "$@"' _ {}
