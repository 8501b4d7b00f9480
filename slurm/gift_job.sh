# shellcheck shell=bash
# The body of slurm/gift_8b.sh and slurm/gift_70b.sh (sourced; they set GIFT_RECIPE, GIFT_NODES,
# GIFT_GPUS_PER_NODE, GIFT_SIZE, REPO and pass their arguments on).
#
# Arguments: [--dry-run] [--set key=value ...]   (DRY_RUN=1 works too; --set goes to the dry run and trainer)
#
# --dry-run (no cluster needed): `python -m megatron_gift.cli.dry_run` for the script's world size (layout +
#   per-GPU memory) and the commands a job would run.
# In a job: the dry run again as a preflight (PREFLIGHT=1), the HF -> Megatron conversion when MCORE_DIR is
#   missing (CONVERT=1; else it stops and prints the command), then one srun task per node running
#   slurm/node_launch.sh (ft_launcher, else torchrun) with `--resume auto`.
# Stop and requeue: Slurm sends SIGUSR1 to this shell STOP_LEAD seconds before the time limit
#   (#SBATCH --signal=B:USR1@600); the trap forwards it to the job step (srun passes USR1 on to its tasks;
#   node_launch.sh turns it into SIGTERM for the launcher, which gives the workers STOP_GRACE_S seconds). The
#   trainer finishes its step, saves, writes REQUEUE_FILE into its checkpoint directory and exits with
#   REQUEUE_EXIT_CODE (both from megatron_gift/resilience/stop.py). A launcher reports 1 for any failed worker, so
#   this script requeues (`scontrol requeue $SLURM_JOB_ID`) when that file exists or srun returned the code.
#   The requeued job runs this script again and resumes from the newest complete checkpoint.
set -uo pipefail

die() { echo "[gift] error: $*" >&2; exit 1; }

DRY_RUN="${DRY_RUN:-0}"
EXTRA_SETS=()
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --set) [[ $# -ge 2 ]] || die "--set needs key=value"; EXTRA_SETS+=(--set "$2"); shift ;;
        --set=*) EXTRA_SETS+=(--set "${1#--set=}") ;;
        -h | --help) sed -n '2,22p' "$REPO/slurm/gift_job.sh"; exit 0 ;;
        *) die "unknown argument '$1' (use --dry-run and --set key=value)" ;;
    esac
    shift
done

# shellcheck source=slurm/cluster.env
source "$REPO/slurm/cluster.env"
cd "$REPO" || die "cannot cd to $REPO"

NODES="${SLURM_JOB_NUM_NODES:-$GIFT_NODES}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$GIFT_GPUS_PER_NODE}"
hf_var="HF_DIR_$GIFT_SIZE" mcore_var="MCORE_DIR_$GIFT_SIZE"
HF_DIR="${!hf_var}" MCORE_DIR="${!mcore_var}"
RUN_NAME="$(basename "$GIFT_RECIPE" .yaml)"
RUN_DIR="${RUN_DIR:-$RUNS_ROOT/$RUN_NAME}"
SAVE_DIR="${SAVE_DIR:-$RUN_DIR/checkpoints}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -n "$VENV" ]]; then PYTHON="$VENV/bin/python"
    elif [[ -z "$CONTAINER_IMAGE" && -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"
    else PYTHON=python; fi
fi

container_args=()
if [[ -n "$CONTAINER_IMAGE" ]]; then
    container_args=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO"
                    --container-mounts="$REPO:$REPO${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi

# What the installed package provides: whether ParallelConfig has a `recompute` key yet (see RECOMPUTE in
# cluster.env), and the trainer's requeue protocol from the module that owns it (megatron_gift/resilience/stop.py).
probe_package() {
    local out
    out="$("${@}" "$PYTHON" -c '
import dataclasses
from megatron_gift.config.schema import ParallelConfig
print(int("recompute" in {f.name for f in dataclasses.fields(ParallelConfig)}), end=" ")
try:
    from megatron_gift.resilience.stop import REQUEUE_EXIT_CODE, REQUEUE_FILE
    print(REQUEUE_EXIT_CODE, REQUEUE_FILE)
except ImportError:
    print("- -")' 2> /dev/null)" || die "cannot import megatron_gift with $PYTHON${CONTAINER_IMAGE:+ (container)}"
    read -r HAS_RECOMPUTE_KEY REQUEUE_EXIT_CODE REQUEUE_FILE <<< "$out"
    if [[ "$REQUEUE_EXIT_CODE" == - ]]; then
        echo "[gift] megatron_gift.resilience.stop not importable: requeue code $REQUEUE_EXIT_CODE_FALLBACK," \
             "file $REQUEUE_FILE_FALLBACK (slurm/cluster.env fallbacks)"
        REQUEUE_EXIT_CODE="$REQUEUE_EXIT_CODE_FALLBACK" REQUEUE_FILE="$REQUEUE_FILE_FALLBACK"
    fi
}
if [[ "$DRY_RUN" == 1 || -z "$CONTAINER_IMAGE" ]]; then
    probe_package
else  # the batch host need not have the Python environment: probe inside the container
    probe_package srun --nodes=1 --ntasks=1 "${container_args[@]}"
fi

recompute_sets=() recompute_what_if=()
if [[ -n "$RECOMPUTE" ]]; then
    if [[ "$HAS_RECOMPUTE_KEY" == 1 ]]; then recompute_sets=(--set "parallel.recompute=$RECOMPUTE")
    else recompute_what_if=(--recompute "$RECOMPUTE"); fi
fi

dry_run_cmd=("$PYTHON" -m megatron_gift.cli.dry_run "$GIFT_RECIPE" --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE"
             --gpu-mem-gib "$GPU_MEM_GIB" "${recompute_what_if[@]}" "${recompute_sets[@]}" "${EXTRA_SETS[@]}")
train_args=("$GIFT_RECIPE" --resume auto
            --set "model.hf_dir=$HF_DIR" --set "model.mcore_dir=$MCORE_DIR"
            --set "data.path=$TRAIN_DATA" --set "eval_data.path=$EVAL_DATA"
            --set "trainer.run_dir=$RUN_DIR" --set "trainer.save_dir=$SAVE_DIR"
            --set "trainer.save_every=$SAVE_EVERY"
            "${recompute_sets[@]}" "${EXTRA_SETS[@]}")
convert_cmd=("$PYTHON" tools/convert_hf_to_mcore.py --hf-dir "$HF_DIR" --out "$MCORE_DIR" --dtype bfloat16)

if [[ "$DRY_RUN" == 1 ]]; then
    echo "== dry run: $GIFT_RECIPE for $NODES node(s) x $GPUS_PER_NODE GPUs =="
    echo "\$ ${dry_run_cmd[*]}"
    "${dry_run_cmd[@]}"
    rc=$?
    echo "== a job would run (no srun here) =="
    echo "conversion if $MCORE_DIR is missing (CONVERT=1): ${convert_cmd[*]}"
    echo "per node: srun --nodes=$NODES --ntasks-per-node=1 ${container_args[*]:+${container_args[*]} }bash" \
         "slurm/node_launch.sh" \
         "(ft_launcher --nnodes=$NODES --nproc-per-node=$GPUS_PER_NODE --max-restarts=$MAX_RESTARTS" \
         "--term-timeout=$STOP_GRACE_S --rdzv-endpoint=<first node>:$RDZV_PORT, else torchrun) $TRAIN_CMD"
    echo "trainer arguments: ${train_args[*]}"
    echo "stop: SIGUSR1 600 s before the time limit -> srun -> node_launch.sh -> launcher SIGTERM ->" \
         "save, exit $REQUEUE_EXIT_CODE / $SAVE_DIR/$REQUEUE_FILE -> scontrol requeue"
    if [[ ${#recompute_what_if[@]} -gt 0 ]]; then
        echo "note: RECOMPUTE=$RECOMPUTE is a what-if above: ParallelConfig has no 'recompute' key yet, and a job" \
             "refuses to start until it has (the trainer would build the model without recompute)"
    fi
    exit "$rc"
fi

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job: submit with sbatch (slurm/cluster.env), or use --dry-run"
mkdir -p "$RUN_DIR" "$SAVE_DIR" || die "cannot create $RUN_DIR"
echo "[gift] job $SLURM_JOB_ID (restart count ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $GIFT_RECIPE"
if [[ ${#recompute_what_if[@]} -gt 0 ]]; then
    die "RECOMPUTE=$RECOMPUTE but megatron_gift's ParallelConfig has no 'recompute' key: the trainer would build" \
        "the model without activation recompute and run out of memory at the recipe's lengths (see the dry run)." \
        "Set RECOMPUTE= to launch anyway."
fi
srun_one() { srun --nodes=1 --ntasks=1 "${container_args[@]}" "$@"; }
if [[ "$PREFLIGHT" == 1 ]]; then
    srun_one "${dry_run_cmd[@]}" || die "the dry run refused this layout for $NODES x $GPUS_PER_NODE GPUs (above)"
fi
if [[ ! -d "$MCORE_DIR" ]]; then
    [[ "$CONVERT" == 1 ]] || die "$MCORE_DIR does not exist: convert once with CONVERT=1 or run: ${convert_cmd[*]}"
    srun_one "${convert_cmd[@]}" || die "conversion failed"
fi

MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)"
export GIFT_NODES="$NODES" GIFT_GPUS_PER_NODE="$GPUS_PER_NODE" GIFT_RDZV_ENDPOINT="$MASTER_ADDR:$RDZV_PORT"
export GIFT_RDZV_ID="$SLURM_JOB_ID" MAX_RESTARTS STOP_GRACE_S TRAIN_CMD VENV
export FT_INITIAL_HEARTBEAT_TIMEOUT FT_HEARTBEAT_TIMEOUT FT_WORKLOAD_CHECK_INTERVAL
rm -f "$SAVE_DIR/$REQUEUE_FILE"  # a request left by an earlier attempt is not this attempt's

srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${container_args[@]}" \
    bash "$REPO/slurm/node_launch.sh" "${train_args[@]}" &
srun_pid=$!
stop_signal=""
# shellcheck disable=SC2329  # called by the traps below
forward_stop() {
    stop_signal="$1"
    echo "[gift] $1: forwarding SIGUSR1 to the job step (workers save and exit)"
    kill -USR1 "$srun_pid" 2> /dev/null
}
trap 'forward_stop SIGUSR1' USR1
trap 'forward_stop SIGTERM' TERM

while :; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2> /dev/null || break  # srun is gone: rc is its status; else a trap interrupted wait
done
if ((rc > 128)); then  # a trap may have interrupted wait just as srun ended: its real status
    wait "$srun_pid" 2> /dev/null
    last=$?
    ((last != 127)) && rc=$last
fi

if [[ -f "$SAVE_DIR/$REQUEUE_FILE" || "$rc" == "$REQUEUE_EXIT_CODE" ]]; then
    echo "[gift] the trainer saved and asked for a requeue (exit $rc): scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed; resubmit to resume from $SAVE_DIR"
    exit 0
fi
if [[ -n "$stop_signal" ]]; then
    echo "[gift] stopped on $stop_signal but no $SAVE_DIR/$REQUEUE_FILE: not requeued (exit $rc)" >&2
fi
echo "[gift] done (exit $rc)"
exit "$rc"
