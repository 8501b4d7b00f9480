"""The checkpoint writer's helper process dies with the trainer: SIGKILL the parent, the helper is gone.

A child Python process starts megatron's results-queue manager the way the trainer's first save does
(mcore/dist_ckpt.writer_helper_dies_with_parent), prints the helper's pid and waits; it is SIGKILLed.
Before the fix the helper (a spawned multiprocessing Manager, ~270 MiB with its imports) stayed alive.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

CHILD = r"""
import sys, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_gift.mcore.dist_ckpt import writer_helper_dies_with_parent
if __name__ == "__main__":
    writer_helper_dies_with_parent()
    print(filesystem_async._results_queue._manager._process.pid, flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped) counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_writer_helper_dies_when_the_trainer_is_killed(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    helper = None
    try:
        helper = int(proc.stdout.readline())
        assert _alive(helper)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while _alive(helper) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(helper), "the writer helper outlived the killed trainer"
    finally:
        proc.kill()
        if helper is not None and _alive(helper):
            os.kill(helper, signal.SIGKILL)
