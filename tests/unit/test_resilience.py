"""Stop requests: signal handlers only set a flag, the budget accounts for the next step and save, and
`agree` takes the maximum over ranks with one all-reduce (2 gloo processes). Runtime: ~10-30 s (one spawn)."""
from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from megatron_gift.mcore.testing.harness import run_distributed
from megatron_gift.resilience.stop import REQUEUE_EXIT_CODE, StopRequest


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_requeue_code_is_a_plain_documented_exit_status():
    assert REQUEUE_EXIT_CODE == 75  # EX_TEMPFAIL; Slurm scripts test this value (README "Long runs")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_only_sets_a_flag_and_handlers_are_restored(sig):
    previous = signal.getsignal(sig)
    stop = StopRequest().install()
    try:
        assert stop.agree() is None
        os.kill(os.getpid(), sig)  # delivered to this (main) thread before kill() returns to Python code
        assert stop.signal_name == signal.Signals(sig).name
        assert stop.agree() == f"signal {signal.Signals(sig).name}"
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) is previous


def test_budget_stops_before_the_next_step_and_save_would_overrun():
    clock = FakeClock()
    stop = StopRequest(time_budget_s=100.0, clock=clock)
    stop.note_step(10.0)
    stop.note_save(5.0)
    clock.now += 84.0  # 84 + 10 + 5 = 99 < 100: one more step fits
    assert stop.agree() is None
    clock.now += 1.0   # 85 + 15 = 100: the next step and its save would reach the budget
    assert stop.agree() == "wall-clock budget"
    assert StopRequest(time_budget_s=0.0, clock=clock).agree() is None  # 0: no budget


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="time_budget_s must be >= 0"):
        StopRequest(time_budget_s=-1)


def _agree(rank, world_size, scenarios):
    """For each (flagged_rank, budget_rank): this rank's agreed reason and how many all-reduces it took."""
    out = []
    original = dist.all_reduce
    for flagged_rank, budget_rank in scenarios:
        stop = StopRequest(time_budget_s=1e-9 if rank == budget_rank else 0.0)
        if rank == flagged_rank:
            stop.signal_name = "SIGUSR1"
        calls = []
        dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        try:
            reason = stop.agree()
        finally:
            dist.all_reduce = original
        out.append((reason, len(calls)))
    return out


@pytest.mark.distributed
def test_all_ranks_agree_with_one_all_reduce_and_a_signal_wins_over_the_budget():
    r0, r1 = run_distributed(_agree, 2, scenarios=[(1, 0), (-1, 1), (-1, -1)])
    assert [r for r, _ in r0] == ["signal (on another rank)", "wall-clock budget", None]
    assert [r for r, _ in r1] == ["signal SIGUSR1", "wall-clock budget", None]
    assert all(n == 1 for _, n in r0 + r1)
