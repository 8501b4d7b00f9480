"""Asynchronous checkpoint saves (megatron's async dist-checkpoint request run by an AsyncCallsQueue): the
committed checkpoint equals a synchronous save of the same state bitwise, it becomes complete (marker +
rename) only when the writer finished, and a writer that fails raises at the next poll, leaving no complete
checkpoint behind. One rank, in this process: megatron forks its writer from the training process, and in
the harness's spawned (daemonic, threaded) ranks those forks were seen to hang; the trainer runs async saves
in its own process (tests/integration/test_resume.py, the SIGTERM case). Runtime: ~10 s."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_gift.checkpoint.manager import CheckpointManager, verify
from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_checkpoint_reshard import _microbatches, _setup, _steps
from tests.distributed.test_gift_schedule import make_groups

pytestmark = pytest.mark.distributed


def _save(mgr, ddp, optimizer, step, async_saver):
    from megatron_gift.mcore import dist_ckpt

    tmp = mgr.begin(step)
    if dist.get_rank() == 0:
        (tmp / "model").mkdir()
    dist.barrier()
    request = dist_ckpt.save_training_state(ddp, optimizer, {"gift": {"step": step}}, tmp / "model",
                                            async_save=async_saver is not None)
    if request is None:
        mgr.commit(tmp, step)
    else:
        async_saver.submit(request, lambda: mgr.commit(tmp, step), what=str(tmp))
    return tmp


def _async(rank, world_size, root):
    from megatron_gift.mcore import dist_ckpt

    out = {}
    try:
        ddp, optimizer, scheduler, schedule = _setup(distopt=True)
        _steps(schedule, optimizer, scheduler, _microbatches(make_groups(n_groups=4, size=4, seed=5)), 1)
        saver = dist_ckpt.AsyncSaver()
        sync_mgr, async_mgr = CheckpointManager(f"{root}/sync"), CheckpointManager(f"{root}/async")
        _save(sync_mgr, ddp, optimizer, 1, None)
        tmp = _save(async_mgr, ddp, optimizer, 1, saver)
        out["pending_after_submit"] = saver.pending
        saver.poll(blocking=True)
        out["pending_after_poll"] = saver.pending
        out["tmp_gone"] = not tmp.exists()
        # A writer that fails (disk full at its fsync, inside megatron's writer process): reported at the next poll.
        original = os.fsync

        def disk_full(fd):
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")

        os.fsync = disk_full  # in place while megatron forks its writer, which inherits it
        try:
            _save(async_mgr, ddp, optimizer, 2, saver)
        finally:
            os.fsync = original
        try:
            saver.poll(blocking=True)
            out["error"] = None
        except dist_ckpt.AsyncSaveError as exc:
            out["error"] = str(exc)
        return out
    finally:
        dist_ckpt.shutdown_writer_helpers()


def test_async_save_equals_sync_and_a_failed_write_raises(tmp_path):
    from megatron_gift.mcore.dist_ckpt import canonical_checkpoint_tensors

    results = run_distributed(_async, 1, root=str(tmp_path))
    for r in results:
        assert r["pending_after_submit"] == 1 and r["pending_after_poll"] == 0 and r["tmp_gone"]
        assert r["error"] is not None and "No space left on device (simulated)" in r["error"], r["error"]
        assert "tmp.step_00000002" in r["error"]  # names the save that failed
    sync_ckpt, async_ckpt = tmp_path / "sync" / "step_00000001", tmp_path / "async" / "step_00000001"
    assert verify(sync_ckpt) is None and verify(async_ckpt) is None
    a, b = canonical_checkpoint_tensors(sync_ckpt / "model"), canonical_checkpoint_tensors(async_ckpt / "model")
    assert a.keys() == b.keys() and any("exp_avg_sq" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The failed save never became a checkpoint: no step_2, its tmp dir has no marker, auto resumes step 1.
    assert not (tmp_path / "async" / "step_00000002").exists()
    assert verify(tmp_path / "async" / "tmp.step_00000002") is not None
    assert CheckpointManager(tmp_path / "async", log=lambda m: None).select("auto") == Path(async_ckpt)
