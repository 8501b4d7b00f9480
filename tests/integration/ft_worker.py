"""A training-like worker for the fault-tolerance tests: `ft_worker.py MODE OUT_DIR STEPS [TRAINER ARGS]` under
ft_launcher (trainer arguments, as slurm/gift_job.sh passes them, are ignored except trainer.save_dir).

Every step all-reduces a gradient over gloo, takes an SGD step and sends a heartbeat through
megatron_gift.resilience.fault_tolerance; rank 0 then saves {step, weight} atomically to OUT_DIR/ckpt.pt, which every
rank resumes from after a restart, and each rank appends {restart, step, active, weight} to
OUT_DIR/rank{R}.jsonl. The final weight is -0.3 x STEPS whatever was restarted.
On the first attempt only (TORCHELASTIC_RESTART_COUNT == 0) MODE injects a fault at step FAULT_STEP:
  hang      rank 1 stops heartbeating (sleeps), so rank 0 blocks in the next all-reduce;
  die       rank 1 exits with code 3;
  stop      every rank asks the launcher not to restart (request_shutdown) and exits with code 75;
  none      no fault.
In mode none a stop signal (SIGTERM / SIGUSR1, as the launcher forwards it) ends the current step; then rank 0
writes the requeue file into trainer.save_dir (the trainer's protocol, megatron_gift/resilience/stop.py), every rank
records {"event": SIGNAME} and exits with the requeue code 75.
"""
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from megatron_gift.resilience.fault_tolerance import FaultTolerance

FAULT_STEP = 2


def main() -> int:
    mode, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    save_dir = next((a.split("=", 1)[1] for a in sys.argv[4:] if a.startswith("trainer.save_dir=")), out_dir)
    rank, restart = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    got_signal = []
    if mode == "none":  # the other modes keep the default SIGTERM, which the launcher uses to stop workers
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: got_signal.append(signal.Signals(signum).name))
    dist.init_process_group("gloo")
    ft = FaultTolerance.start(log=lambda msg: print(f"[rank {rank} restart {restart}] {msg}", flush=True))
    ckpt = os.path.join(out_dir, "ckpt.pt")
    state = torch.load(ckpt) if os.path.exists(ckpt) else {"step": -1, "weight": torch.zeros(4)}
    weight = state["weight"]
    log = open(os.path.join(out_dir, f"rank{rank}.jsonl"), "a")
    for step in range(state["step"] + 1, steps):
        grad = torch.full((4,), float(rank + 1))
        dist.all_reduce(grad)
        weight -= 0.1 * grad
        if restart == 0 and step == FAULT_STEP and mode != "none":
            if mode == "hang" and rank == 1:
                time.sleep(3600)
            if mode == "die" and rank == 1:
                os._exit(3)
            if mode == "stop":
                ft.request_shutdown("stop requested (test)")
                log.write(json.dumps({"restart": restart, "step": step, "event": "stop"}) + "\n")
                log.close()
                return 75
        ft.heartbeat()
        if rank == 0:
            torch.save({"step": step, "weight": weight.clone()}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
        log.write(json.dumps({"restart": restart, "step": step, "active": ft.active,
                              "weight": weight[0].item()}) + "\n")
        log.flush()
        if got_signal:
            if rank == 0:
                with open(os.path.join(save_dir, "requeue_request.json"), "w") as f:
                    json.dump({"step": step, "reason": got_signal[0]}, f)
            log.write(json.dumps({"restart": restart, "step": step, "event": got_signal[0]}) + "\n")
            log.close()
            return 75
        time.sleep(0.2)
    log.close()
    ft.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
