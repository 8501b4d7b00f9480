#!/usr/bin/env bash
# GIFT on a Llama-3.1-8B-class model: 1 node x 8 H100 80GB, Megatron TP8 (sequence parallel,
# distributed optimizer, bf16), vLLM TP8 rollouts colocated (examples/llama3_8b_gift.yaml).
#   bash slurm/gift_8b.sh --dry-run [--set key=value ...]     layout + per-GPU memory check, no cluster
#   source slurm/cluster.env && sbatch slurm/gift_8b.sh        from the repository root (paths in cluster.env)
# Once: the Megatron checkpoint for TP/PP > 1 (CONVERT=1 does it in the job):
#   python tools/convert_hf_to_mcore.py --hf-dir $HF_DIR_8B --out $MCORE_DIR_8B --dtype bfloat16
# Stop/requeue protocol, fault tolerance and restarts: slurm/gift_job.sh and slurm/README.md.
#SBATCH --job-name=gift-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
GIFT_RECIPE=examples/llama3_8b_gift.yaml
GIFT_NODES=1
GIFT_GPUS_PER_NODE=8
GIFT_SIZE=8B
# sbatch runs a spooled copy of this file: find the repository from the submit directory (or GIFT_REPO).
if [[ -n "${SLURM_JOB_ID:-}" ]]; then REPO="${GIFT_REPO:-$SLURM_SUBMIT_DIR}"
else REPO="${GIFT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"; fi
if [[ ! -f "$REPO/slurm/gift_job.sh" ]]; then
    echo "no slurm/gift_job.sh under '$REPO': submit from the repository root or set GIFT_REPO" >&2
    exit 1
fi
# shellcheck source=slurm/gift_job.sh
source "$REPO/slurm/gift_job.sh"
