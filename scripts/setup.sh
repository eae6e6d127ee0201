#!/usr/bin/env bash
# Install dino-ray and its test tools, exactly as locked, into the current Python (use a venv).
#
# The lock (requirements/cpu.lock, made by scripts/lock.sh) pins every package we test with. torch
# goes first, chosen for the machine: the CPU build unless an NVIDIA GPU is present (a bare
# `pip install torch` pulls multi-GB CUDA wheels even onto CPU-only machines). The rest of the lock
# follows with --no-deps (the lock is already complete, so pip resolves nothing) and without build
# isolation, so that DeepSpeed, which ships as a source package, builds against that torch instead of
# downloading another one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOCK="${DINO_RAY_LOCK:-requirements/cpu.lock}"
TORCH_VERSION=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$LOCK")
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" && -z "${CI:-}" ]]; then
  echo "[setup] note: no virtual environment is active; installing into $("$PY" -c 'import sys; print(sys.prefix)')"
fi
reqs=$(mktemp); trap 'rm -f "$reqs"' EXIT
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: CUDA torch==$TORCH_VERSION, the rest from $LOCK"
  pip_install "torch==$TORCH_VERSION"
  grep -v '^torch==' "$LOCK" > "$reqs"
else
  if "$PY" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_VERSION+cpu')" 2>/dev/null; then
    echo "[setup] torch $TORCH_VERSION+cpu already installed"
  else
    # A local CPU wheel (pip's find-links) wins if present; otherwise PyTorch's CPU index serves it.
    picked=$("$PY" -m pip install --dry-run --no-deps --quiet --report - "torch==$TORCH_VERSION+cpu" 2>/dev/null \
             | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' || true)
    if [[ -n "$picked" ]]; then
      echo "[setup] no GPU: installing torch $picked (CPU build)"
      pip_install "torch==$TORCH_VERSION+cpu"
    else
      echo "[setup] no GPU: installing torch==$TORCH_VERSION+cpu from the PyTorch CPU index"
      pip_install "torch==$TORCH_VERSION+cpu" --extra-index-url "${DINO_RAY_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
  fi
  cp "$LOCK" "$reqs"
fi
pip_install setuptools wheel
pip_install --no-deps --no-build-isolation -r "$reqs"
pip_install --no-deps --no-build-isolation -e .
"$PY" -m pip check --disable-pip-version-check >/dev/null || { "$PY" -m pip check; echo "[setup] the environment does not match $LOCK" >&2; exit 1; }
echo "[setup] done: $("$PY" -c 'import torch, ray, deepspeed; print("torch", torch.__version__, "ray", ray.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
