#!/usr/bin/env bash
# GIFT on Qwen3-30B-A3B-Base (mixture of experts), the GIFT paper's recipe: 8 nodes x 8 H100 80GB, Megatron TP4 x CP2 x DP8
# with experts over EP8 (sequence parallel, distributed optimizer, bf16, full recompute), vLLM TP4 rollouts colocated
# (examples/qwen3_30b_a3b_gift.yaml). Dry run: fits, 77.3 of 80 GiB on every GPU (logits 17.4, grads 15.0, vLLM 24).
#   bash slurm/gift_qwen3_30b_a3b.sh --dry-run [--set key=value ...]     layout + per-GPU memory check, no cluster
#   source slurm/cluster.env && sbatch slurm/gift_qwen3_30b_a3b.sh        from the repository root (paths in cluster.env)
# Once: the Megatron checkpoint for TP / EP > 1 (CONVERT=1 does it in the job):
#   python tools/convert_hf_to_mcore.py --hf-dir $HF_DIR_QWEN3_30B_A3B --out $MCORE_DIR_QWEN3_30B_A3B --dtype bfloat16
# Stop/requeue protocol, fault tolerance and restarts: slurm/gift_job.sh and slurm/README.md.
#SBATCH --job-name=gift-qwen3-30b-a3b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
GIFT_RECIPE=examples/qwen3_30b_a3b_gift.yaml
GIFT_NODES=8
GIFT_GPUS_PER_NODE=8
GIFT_SIZE=QWEN3_30B_A3B
# sbatch runs a spooled copy of this file: find the repository from the submit directory (or GIFT_REPO).
if [[ -n "${SLURM_JOB_ID:-}" ]]; then REPO="${GIFT_REPO:-$SLURM_SUBMIT_DIR}"
else REPO="${GIFT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"; fi
if [[ ! -f "$REPO/slurm/gift_job.sh" ]]; then
    echo "no slurm/gift_job.sh under '$REPO': submit from the repository root or set GIFT_REPO" >&2
    exit 1
fi
# shellcheck source=slurm/gift_job.sh
source "$REPO/slurm/gift_job.sh"
