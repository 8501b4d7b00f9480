"""Helper processes die with the process that started them (a SIGKILLed trainer leaves nothing running).

Owns `die_with_parent(parent_pid)`, an initializer for helper processes (multiprocessing managers, writer
processes): on Linux the kernel sends the helper SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG); where
that is unavailable a daemon thread polls the parent's pid every second and exits. Either way, a parent that
already died before the call makes the helper exit at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> str:
    """Arrange for this process to end when `parent_pid` ends; returns the mechanism used ('prctl' / 'poll')."""
    mechanism = "prctl" if _set_pdeathsig() else "poll"
    if mechanism == "poll":
        threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True, name="die-with-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    return mechanism


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os._exit(1)
