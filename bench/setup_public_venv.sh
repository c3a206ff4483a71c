#!/usr/bin/env bash
# Create bench/.venv-public with the public `speculators` package from PyPI, for the
# side-by-side benchmark. Nothing from it is vendored: the runner imports it at run time.
#
# torch is pinned to the version the machine has as a local CPU wheel (2.13.0) so no GPU
# build is downloaded. The public package declares torchvision/torchaudio as requirements
# but never imports them (checked for 0.9.0: `grep -r torchvision` finds nothing), so we
# install it with --no-deps and then its import-time requirements explicitly, skipping
# those two (they would pull CUDA builds).
#
# Offline (PUBLIC_OFFLINE=1; bench/run.sh --gpu sets it when bench/public-wheels exists): installs from
# bench/public-wheels (bench/pack_public_wheels.sh) into a venv that sees the machine's own
# CUDA torch and transformers.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${PUBLIC_VENV:-$HERE/.venv-public}"
PUBLIC_VERSION="${PUBLIC_SPECULATORS_VERSION:-0.9.0}"
PY="${PYTHON:-python3}"

# -P and cd /: this checkout's own speculators (and its egg-info) must not be found.
if [[ -x "$VENV/bin/python" ]] && (cd / && "$VENV/bin/python" -P -c "import importlib.metadata as m, sys; sys.exit(m.version('speculators') != '$PUBLIC_VERSION')") 2>/dev/null; then
  echo "public venv ready: $VENV (speculators $PUBLIC_VERSION)"
  exit 0
fi
WHEELS="${PUBLIC_WHEELS:-$HERE/public-wheels}"
if [[ "${PUBLIC_OFFLINE:-}" == 1 ]]; then
  # Offline (a GPU machine with no package index): a venv over the machine's own torch
  # (CUDA build) and transformers, plus the wheels carried in $WHEELS
  # (bench/pack_public_wheels.sh); what the machine already has is not reinstalled.
  if [[ ! -d "$WHEELS" && -f "$WHEELS.tar.xz" ]]; then
    "$PY" "$HERE/wheel_pack.py" unpack "$WHEELS.tar.xz" "$WHEELS"
  fi
  [[ -d "$WHEELS" ]] || { echo "no package index and no $WHEELS(.tar.xz) (bench/pack_public_wheels.sh)" >&2; exit 1; }
  "$PY" -m venv --system-site-packages "$VENV"
  # --system-site-packages sees the base interpreter's packages only: when "$PY" is itself a
  # venv (or conda env) holding torch, its site directories are added by a .pth file, after
  # the new venv's own (so the public package installed here wins over any other speculators).
  SITE_DIRS="$("$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))')"
  VENV_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$SITE_DIRS" > "$VENV_SITE/_machine_site_packages.pth"
  PIP=("$VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS")
  "${PIP[@]}" --no-deps "speculators==$PUBLIC_VERSION" "hs-connectors==$PUBLIC_VERSION"
  mapfile -t REQS < "$HERE/public_requirements.txt"
  "${PIP[@]}" "${REQS[@]}"
  (cd / && "$VENV/bin/python" -P -c "import importlib.metadata as m, speculators, hs_connectors, torch; print('public speculators', m.version('speculators'), 'torch', torch.__version__, 'cuda', torch.cuda.is_available())")
  exit 0
fi
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"${PIP[@]}" --no-deps "speculators==$PUBLIC_VERSION" "hs-connectors==$PUBLIC_VERSION"
# Requirements of speculators 0.9.0 that its training path imports (from its METADATA),
# minus torchvision/torchaudio (never imported) and the optional mooncake extra; the list
# the offline path above installs is bench/public_requirements.txt plus these.
mapfile -t REQS < "$HERE/public_requirements.txt"
"${PIP[@]}" "${REQS[@]}" "huggingface-hub" "numpy>=2.0.0,<=2.5.4" "safetensors" "tqdm>=4.66.3,<=4.70.1" \
  "transformers>=5.0.0,<=5.19.0"
# Import from a neutral directory so /work/main's own `speculators` is not on the path.
(cd / && "$VENV/bin/python" -P -c "import importlib.metadata as m, speculators, hs_connectors, torch; print('public speculators', m.version('speculators'), 'torch', torch.__version__)")
