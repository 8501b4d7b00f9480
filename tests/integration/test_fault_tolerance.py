"""Fault tolerance under nvidia-resiliency-ext's ft_launcher on CPU (2 gloo workers, tests/integration/ft_worker.py):
a rank that stops heartbeating is detected and the workers are restarted from the last checkpoint, a rank
that dies is restarted, `request_shutdown` keeps the launcher from restarting; without the launcher or the
package the wrapper is inert and says so once. About 15-30 s per launcher run on 2 cores.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gift.resilience.fault_tolerance import MONITOR_SOCKET_ENV, FaultTolerance
from megatron_gift.mcore.testing.harness import free_port

pytest.importorskip("nvidia_resiliency_ext.fault_tolerance")
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/integration/ft_worker.py"
STEPS = 6


def _launch(mode: str, out: Path, max_restarts: int = 1):
    launcher = Path(sys.executable).parent / "ft_launcher"
    cmd = [str(launcher), "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--monitor-interval", "1",
           "--ft-param-initial_rank_heartbeat_timeout", "120", "--ft-param-rank_heartbeat_timeout", "5",
           "--ft-param-workload_check_interval", "1", str(WORKER), mode, str(out), str(STEPS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    records = {r: [json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    return proc.returncode, proc.stdout + proc.stderr, records


def _check_resumed_and_finished(records):
    for rank, recs in records.items():
        first, second = [r for r in recs if r["restart"] == 0], [r for r in recs if r["restart"] == 1]
        assert second, f"rank {rank} was not restarted"
        assert all(r.get("active") for r in first + second if "active" in r)
        # the restarted attempt continues from the checkpoint, not from step 0, and ends where a clean run ends
        assert second[0]["step"] > 0 and second[-1]["step"] == STEPS - 1
        assert second[-1]["weight"] == pytest.approx(-0.3 * STEPS)


def test_hung_rank_is_detected_and_workers_restart(tmp_path):
    rc, log, records = _launch("hang", tmp_path)
    assert rc == 0, log[-3000:]
    assert "Did not get subsequent heartbeat" in log
    assert max(r["step"] for r in records[1] if r["restart"] == 0) == 1  # rank 1 hung at step 2
    _check_resumed_and_finished(records)


def test_dead_rank_is_restarted(tmp_path):
    rc, log, records = _launch("die", tmp_path)
    assert rc == 0, log[-3000:]
    # torchelastic names the failure with the earliest timestamp (second resolution): rank 1's exit 3, or rank 0's
    # failure (exit 1 from its next all-reduce with the dead peer) when both fall in the same second
    failed = re.search(r"failed \(exitcode: (-?\d+)\) local_rank: (\d)", log)
    assert failed, log[-3000:]
    code, rank = int(failed.group(1)), int(failed.group(2))
    assert (rank, code) == (1, 3) or (rank == 0 and code != 0), log[-3000:]
    assert max(r["step"] for r in records[1] if r["restart"] == 0) == 1  # rank 1 died at step 2, before recording it
    _check_resumed_and_finished(records)


def test_request_shutdown_stops_the_launcher_from_restarting(tmp_path):
    rc, log, records = _launch("stop", tmp_path, max_restarts=2)
    assert rc != 0  # workers exited with 75: a failure to torchelastic, but no restart
    assert "ShutdownWorkload" in log
    for recs in records.values():
        assert {r["restart"] for r in recs} == {0} and recs[-1] == {"restart": 0, "step": 2, "event": "stop"}


def test_inert_without_launcher_or_package_and_says_so_once():
    said = []
    ft = FaultTolerance.start(log=said.append, environ={})
    assert not ft.active and len(said) == 1 and f"no {MONITOR_SOCKET_ENV}" in said[0]
    ft.heartbeat()
    with ft.section("step"):
        pass
    assert ft.calculate_timeouts() is False and ft.state_dict() == {}
    ft.request_shutdown("x")
    ft.load_state_dict({"current_timeouts": {}})
    ft.close()
    assert len(said) == 1

    said.clear()
    ft = FaultTolerance.start(log=said.append, environ={MONITOR_SOCKET_ENV: "/tmp/x"},
                              importer=lambda: (None, "nvidia-resiliency-ext is not installed (test)"))
    assert not ft.active and len(said) == 1 and "not installed" in said[0]
