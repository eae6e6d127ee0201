#!/usr/bin/env bash
# Install dino-ray and its test tools into the current Python environment (a venv is recommended).
#
# torch first, chosen for the machine: a CUDA build only where an NVIDIA GPU is present, else the CPU
# build (a bare `pip install torch` pulls multi-GB CUDA wheels even onto CPU-only machines). DeepSpeed
# next, without build isolation so that it builds against that torch instead of downloading another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${DINO_RAY_TORCH_VERSION:-2.13.0}"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing CUDA torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION"
else
  # A local CPU wheel (pip's find-links) wins if present; otherwise use PyTorch's CPU index.
  picked=$("$PY" -m pip install --dry-run --no-deps --quiet --report - "torch==$TORCH_VERSION" 2>/dev/null \
           | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' || true)
  if [[ "$picked" == *"+cpu"* ]]; then
    echo "[setup] no GPU: installing torch $picked (CPU build)"
    pip_install "torch==$TORCH_VERSION"
  else
    echo "[setup] no GPU: installing torch==$TORCH_VERSION from the PyTorch CPU index"
    pip_install "torch==$TORCH_VERSION" --index-url "${DINO_RAY_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
"$PY" -c "import deepspeed" 2>/dev/null || pip_install --no-build-isolation "deepspeed>=0.15"
pip_install -e ".[dev]"
echo "[setup] done: $("$PY" -c 'import torch, ray, deepspeed; print("torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
