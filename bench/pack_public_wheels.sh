#!/usr/bin/env bash
# Download the public `speculators` package and the requirements of its training path as
# wheels into bench/public-wheels and packs them into bench/public-wheels.tar.xz (both
# git-ignored), for a GPU machine that has torch and
# transformers but no package index: carry that folder (it must stay under the 64 MiB a
# device run carries) and `bench/setup_public_venv.sh` installs from it offline, on top of
# the machine's own CUDA torch (a venv with --system-site-packages).
#
#   bench/pack_public_wheels.sh [--python-version 3.12]   # the GPU machine's Python
#
# Left out on purpose, because the GPU machine's image has them (it runs our trainer, which
# needs them too): torch, transformers and what transformers pulls (numpy, tokenizers,
# huggingface-hub, safetensors, regex, pyyaml, tqdm, filelock, packaging). fsspec is carried: `datasets`
# pins an upper bound that a newer fsspec on the machine may not meet.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${PUBLIC_WHEELS:-$HERE/public-wheels}"
PUBLIC_VERSION="${PUBLIC_SPECULATORS_VERSION:-0.9.0}"
PY="${PYTHON:-python3}"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) PYVER="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
# One list, shared with setup_public_venv.sh's offline install (what their training path imports).
mapfile -t REQS < "$HERE/public_requirements.txt"
DL=("$PY" -m pip download --quiet --dest "$OUT" --only-binary=:all: --python-version "$PYVER"
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
    --implementation cp)
# The package itself without its declared dependencies (torchvision/torchaudio: never imported).
"${DL[@]}" --no-deps "speculators==$PUBLIC_VERSION" "hs-connectors==$PUBLIC_VERSION"
"${DL[@]}" "${REQS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
# Drop what the GPU image already has (pip download resolved their dependencies too).
for skip in torch transformers numpy tokenizers huggingface_hub safetensors regex PyYAML pyyaml tqdm filelock \
            packaging nvidia_ triton sympy networkx jinja2 MarkupSafe mpmath hf_xet setuptools; do
  rm -f "$OUT"/"$skip"-*.whl "$OUT"/"$skip"*.whl
done
du -sh "$OUT"
# Carried as one xz archive of the extracted wheels (bench/wheel_pack.py): ~25% smaller.
"$PY" "$HERE/wheel_pack.py" pack "$OUT" "$OUT.tar.xz"
SIZE=$(du -sm "$OUT.tar.xz" | cut -f1)
if (( SIZE >= 64 )); then
  echo "public-wheels.tar.xz is ${SIZE} MiB: over the 64 MiB a device run carries" >&2
  exit 1
fi
echo "carry bench/public-wheels.tar.xz (${SIZE} MiB); bench/run.sh --gpu installs from it offline"
