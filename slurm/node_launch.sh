#!/usr/bin/env bash
# One srun task per node (started by slurm/gift_job.sh): run the fault-tolerance launcher for this node's GPUs.
#
# ft_launcher (nvidia-resiliency-ext) starts GIFT_GPUS_PER_NODE workers, joins the c10d rendezvous on the first
# node, restarts the whole worker group (up to MAX_RESTARTS) when a rank hangs (no heartbeat) or dies, and on
# SIGTERM forwards SIGTERM to the workers and gives them STOP_GRACE_S seconds to save before SIGKILL. Without
# ft_launcher, torchrun does the same minus hang detection.
# A stop request reaches this task as SIGUSR1 (the batch script's trap -> srun -> here) and goes on to the
# launcher as SIGTERM: ft_launcher 0.4.1 handles TERM/INT/HUP/QUIT only, and an unhandled USR1 would kill it.
# Arguments: the trainer's command line after TRAIN_CMD (config, --resume, --set ...).
set -uo pipefail

: "${GIFT_NODES:?}" "${GIFT_GPUS_PER_NODE:?}" "${GIFT_RDZV_ENDPOINT:?}" "${GIFT_RDZV_ID:?}"
: "${MAX_RESTARTS:=3}" "${STOP_GRACE_S:=540}" "${TRAIN_CMD:=-m megatron_gift.train}"
: "${FT_INITIAL_HEARTBEAT_TIMEOUT:=3600}" "${FT_HEARTBEAT_TIMEOUT:=2700}" "${FT_WORKLOAD_CHECK_INTERVAL:=5}"
if [[ -n "${VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
node="${SLURM_NODEID:-0}"
read -r -a train_cmd <<< "$TRAIN_CMD"
common=(--nnodes="$GIFT_NODES" --nproc-per-node="$GIFT_GPUS_PER_NODE" --rdzv-backend=c10d
        --rdzv-endpoint="$GIFT_RDZV_ENDPOINT" --rdzv-id="$GIFT_RDZV_ID" --max-restarts="$MAX_RESTARTS")
if command -v ft_launcher > /dev/null; then
    launcher=(ft_launcher "${common[@]}" --term-timeout="$STOP_GRACE_S" --workers-stop-timeout=60
              --ft-initial-rank-heartbeat-timeout="$FT_INITIAL_HEARTBEAT_TIMEOUT"
              --ft-rank-heartbeat-timeout="$FT_HEARTBEAT_TIMEOUT"
              --ft-workload-check-interval="$FT_WORKLOAD_CHECK_INTERVAL")
else
    echo "[node $node] ft_launcher not found (pip install nvidia-resiliency-ext): torchrun, no hang detection"
    launcher=(torchrun "${common[@]}" --shutdown-timeout="$STOP_GRACE_S")
fi
echo "[node $node] ${launcher[*]} ${train_cmd[*]} $*"
"${launcher[@]}" "${train_cmd[@]}" "$@" &
launcher_pid=$!

# shellcheck disable=SC2329  # called by the traps below
stop() {
    echo "[node $node] $1: asking the launcher to stop the workers (SIGTERM, ${STOP_GRACE_S} s to save)"
    kill -TERM "$launcher_pid" 2> /dev/null
}
trap 'stop SIGUSR1' USR1
trap 'stop SIGTERM' TERM

while :; do
    wait "$launcher_pid"
    rc=$?
    kill -0 "$launcher_pid" 2> /dev/null || break  # gone: rc is its status; else a trap interrupted wait
done
if ((rc > 128)); then  # a trap may have interrupted wait just as the launcher ended: its real status
    wait "$launcher_pid" 2> /dev/null
    last=$?
    ((last != 127)) && rc=$last
fi
exit "$rc"
