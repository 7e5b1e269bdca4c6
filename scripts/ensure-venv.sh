#!/usr/bin/env bash
# Creates (or reuses) the virtualenv .venv in this checkout with sparse_train installed in
# editable mode, plus the extras named in $EXTRAS (comma-separated, default "dev").
#
# torch is installed first and then pinned for every later pip call, so no other package can
# pull a different (multi-GB CUDA) build of it. Which torch build:
#   - TORCH_INDEX set          -> from that index (e.g. https://download.pytorch.org/whl/cu128)
#   - a CPU wheel on local disk -> that wheel ($TORCH_WHEEL_DIRS, pip's find-links, /opt/wheels)
#   - no NVIDIA driver         -> the CPU build from https://download.pytorch.org/whl/cpu
#   - otherwise                -> PyPI's default build (CUDA on Linux x86_64)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
TORCH_WHEEL_DIRS=${TORCH_WHEEL_DIRS:-${PIP_FIND_LINKS:-} /opt/wheels}

stamp="$VENV/.sparse-train-installed"
fingerprint="$(cat pyproject.toml scripts/ensure-venv.sh | sha256sum | cut -c1-16) extras=$EXTRAS torch=$TORCH_VERSION index=$TORCH_INDEX"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ]; then
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "error: sparse_train needs Python >= 3.10; $PYTHON is $("$PYTHON" --version 2>&1) (set PYTHON=...)" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if [ -n "$TORCH_INDEX" ]; then
    "${pip[@]}" install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
  elif "${pip[@]}" install --quiet --no-deps --no-index $(for d in $TORCH_WHEEL_DIRS; do
          [ -d "$d" ] && printf -- '--find-links %s ' "$d"; done) "torch==$TORCH_VERSION" 2>/dev/null; then
    "${pip[@]}" install "torch==$TORCH_VERSION"   # the local wheel is in; now its dependencies
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
  else
    "${pip[@]}" install "torch==$TORCH_VERSION"
  fi
fi

# Pin whatever torch is now installed for every later pip call.
installed_torch=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')
echo "torch==$installed_torch" > "$VENV/torch-constraint.txt"
"${pip[@]}" install -c "$VENV/torch-constraint.txt" -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *,dev,* ]]; then
  # Test oracles only, never imported by the package: megatron-core's pure-torch routing and
  # balancing functions (its models need CUDA, its dependencies are heavy: --no-deps, own folder).
  "${pip[@]}" install --quiet --no-deps --upgrade --target "$VENV/test-oracles" megatron-core==0.16.1
fi
echo "$fingerprint" > "$stamp"
