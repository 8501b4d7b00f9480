"""Stop requests for long runs: signal flags, a wall-clock budget, one all-rank decision, the requeue exit code.

Owns: SIGTERM / SIGUSR1 handlers that only set a flag (Slurm sends SIGUSR1 ahead of the time limit with
`--signal=USR1@SECONDS`, and SIGTERM on preemption or `scancel`), an optional wall-clock budget, and the
step-end decision: every rank contributes its local reason to ONE all-reduce (MAX) over the world, so all
ranks stop after the same step, save one checkpoint together and exit with REQUEUE_EXIT_CODE.
Does not own: saving (trainer.py + checkpoint/manager.py) or relaunching (the Slurm script).

REQUEUE_EXIT_CODE = 75 (EX_TEMPFAIL of sysexits.h: "temporary failure, retry later"). Every rank exits
with it after a stop request was honoured and its checkpoint is complete. A launcher script tests it:

    python -m megatron_gift.train CFG.yaml ...; rc=$?
    if [ "$rc" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi

torchrun (and ft_launcher) report 1 for any failing worker, whatever its code, and may restart workers
when --max-restarts > 0; so rank 0 also writes REQUEUE_FILE ("requeue_request.json") into the checkpoint
directory on such an exit, and every run deletes it when it starts. Scripts that launch through torchrun
test the file instead of the code. Note that torchrun itself must not die on the signal: deliver SIGUSR1 to
the training processes (e.g. `srun` one task per GPU, or `kill -USR1` the workers from a trap), since
torchrun's default handlers turn SIGTERM into killing its workers after a 30 s grace period.
"""
from __future__ import annotations

import signal
import time
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
REQUEUE_FILE = "requeue_request.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# A stop signal that arrived before any StopRequest existed (start-up: config, warm start, model building,
# checkpoint loading); `install_early` records it here and every StopRequest sees it.
_EARLY: Dict[str, Optional[str]] = {"signal": None}


def install_early(signals: Sequence[int] = STOP_SIGNALS) -> None:
    """First thing a training process does: from now on a stop signal is recorded instead of killing it."""
    for sig in signals:
        signal.signal(sig, _early_handler)


def _early_handler(signum, frame) -> None:
    if _EARLY["signal"] is None:
        _EARLY["signal"] = signal.Signals(signum).name


# Reasons are ordered: the all-reduce keeps the largest code, a signal wins over the budget.
_NONE, _BUDGET, _SIGNAL = 0, 1, 2
_NAMES = {_BUDGET: "wall-clock budget", _SIGNAL: "signal"}


class StopRequest:
    """Collects local reasons to stop; `agree()` turns them into one decision shared by all ranks.

    time_budget_s: 0 = none. The run stops after the step at which `elapsed + longest step + longest save`
    would pass the budget, so the last step and the final checkpoint still fit inside it.
    """

    def __init__(self, time_budget_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        if time_budget_s < 0:
            raise ValueError(f"time_budget_s must be >= 0, got {time_budget_s}")
        self.time_budget_s = float(time_budget_s)
        self.clock = clock
        self.start = clock()
        self.signal_name: Optional[str] = None
        self.longest_step_s = 0.0
        self.longest_save_s = 0.0
        self._previous: Dict[int, object] = {}

    # ----- signals: the handler only records, the step loop decides --------------------------------
    def install(self, signals: Sequence[int] = STOP_SIGNALS) -> "StopRequest":
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    # ----- the decision -----------------------------------------------------------------------------
    def note_step(self, seconds: float) -> None:
        self.longest_step_s = max(self.longest_step_s, seconds)

    def note_save(self, seconds: float) -> None:
        self.longest_save_s = max(self.longest_save_s, seconds)

    def local_code(self) -> int:
        if self.signal_name is None and _EARLY["signal"] is not None:
            self.signal_name = _EARLY["signal"]
        if self.signal_name is not None:
            return _SIGNAL
        if self.time_budget_s > 0:
            needed = self.clock() - self.start + self.longest_step_s + self.longest_save_s
            if needed >= self.time_budget_s:
                return _BUDGET
        return _NONE

    def agree(self, group=None, device: Optional[torch.device] = None) -> Optional[str]:
        """One all-reduce (MAX) over `group` (default: the world); the agreed reason, or None to go on.

        Every rank must call it at the same point of every step (it is a collective).
        """
        code = torch.tensor([self.local_code()], dtype=torch.int32, device=device or torch.device("cpu"))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
        value = int(code.item())
        if value == _NONE:
            return None
        if value == _SIGNAL:
            return f"signal {self.signal_name}" if self.signal_name else "signal (on another rank)"
        return _NAMES[value]
