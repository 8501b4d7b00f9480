"""The gloo harness: layouts and per-rank set-up, return values by rank, failures / deaths / hangs on any
rank surface in the parent, the single-process mode, and readable errors for impossible layouts."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from megatron_gift.mcore.cpu_compat import cpu_compat_active
from megatron_gift.mcore.testing.harness import DistributedRunError, run_distributed
from megatron_gift.mcore.parallel import check_parallel_sizes


def _describe_rank(rank: int, world_size: int, base: float):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    total = torch.tensor([float(rank) + base], device="cuda")  # hard-coded cuda device: compat maps it
    dist.all_reduce(total)
    with get_cuda_rng_tracker().fork():
        model_parallel_draw = torch.rand(2)
    return dict(
        rank=dist.get_rank(), world=dist.get_world_size(), backend=dist.get_backend(), total=total.item(),
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        pp=(ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        dp=(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
        threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"), compat=cpu_compat_active(),
        default_draw=torch.rand(2), model_parallel_draw=model_parallel_draw)


@pytest.mark.distributed
def test_four_ranks_tp2_pp2_vpp2_layout_and_set_up():
    out = run_distributed(_describe_rank, 4, tp=2, pp=2, vpp=2, base=0.5)
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    for o in out:
        assert (o["world"], o["backend"], o["total"]) == (4, "gloo", 0 + 1 + 2 + 3 + 4 * 0.5)
        assert o["tp"][1] == 2 and o["pp"][1] == 2 and o["dp"] == (0, 1) and o["vpp"] == 2
        assert (o["threads"], o["omp"], o["compat"]) == (1, "1", True)
    # Megatron's default order tp-cp-ep-dp-pp: tp is the fastest-varying rank coordinate.
    assert [(o["tp"][0], o["pp"][0]) for o in out] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # Seeded RNG: the default stream is the same everywhere; the model-parallel stream differs by
    # tensor-parallel rank only (seed + 2718 + tp_rank, as on GPUs).
    assert all(torch.equal(o["default_draw"], out[0]["default_draw"]) for o in out)
    by_tp = {o["tp"][0]: o["model_parallel_draw"] for o in out}
    assert not torch.equal(by_tp[0], by_tp[1])
    assert all(torch.equal(o["model_parallel_draw"], by_tp[o["tp"][0]]) for o in out)


def _fail_on_rank(rank: int, world_size: int, bad_rank: int):
    if rank == bad_rank:
        raise ValueError(f"boom from rank {bad_rank}")
    dist.barrier()  # rank 0 blocks here: the parent must not wait for its timeout
    return rank


@pytest.mark.distributed
def test_exception_on_one_rank_is_raised_in_parent_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_on_rank, 2, timeout=120, bad_rank=1)
    assert info.value.rank == 1
    message = str(info.value)
    assert "rank 1 of 2 failed" in message
    assert "ValueError: boom from rank 1" in message and "_fail_on_rank" in message
    assert time.monotonic() - start < 100  # reported on failure, not after rank 0's 120 s timeout


def _exit_hard_on_rank_one(rank: int, world_size: int):
    if rank == 1:
        os._exit(3)  # no traceback, no report: as a segfault or an OOM kill looks
    dist.barrier()


@pytest.mark.distributed
def test_rank_that_dies_without_reporting_is_named():
    # Rank 0's "connection reset" from the barrier is an echo: the message must lead with rank 1.
    expected = r"rank 1 of 2 failed:\nprocess died: exited with code 3"
    with pytest.raises(DistributedRunError, match=expected) as info:
        run_distributed(_exit_hard_on_rank_one, 2, timeout=120)
    assert info.value.rank == 1


def _hang_on_rank_zero(rank: int, world_size: int):
    if rank == 0:
        time.sleep(600)
    return rank


@pytest.mark.distributed
def test_hung_rank_times_out_with_clear_error():
    start = time.monotonic()
    expected = r"ranks \[0\] of 2 did not return within timeout=2 s after start-up"
    with pytest.raises(DistributedRunError, match=expected) as info:
        run_distributed(_hang_on_rank_zero, 2, timeout=2)
    assert info.value.rank == 0 and "returned: [1]" in str(info.value)
    assert time.monotonic() - start < 300


def _single(rank: int, world_size: int, scale: float):
    from megatron.core import parallel_state as ps
    return dict(rank=rank, world=world_size, tp=ps.get_tensor_model_parallel_world_size(),
                value=torch.ones(3, device="cuda") * scale, compat=cpu_compat_active())


def test_single_process_mode_runs_in_process_and_cleans_up():
    from megatron.core import parallel_state as ps
    rng_state, threads = torch.get_rng_state(), torch.get_num_threads()
    (out,) = run_distributed(_single, 1, scale=2.5)
    assert torch.equal(torch.get_rng_state(), rng_state) and torch.get_num_threads() == threads
    assert (out["rank"], out["world"], out["tp"], out["compat"]) == (0, 1, 1, True)
    assert torch.equal(out["value"], torch.full((3,), 2.5))
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized() and not cpu_compat_active()
    with pytest.raises(DistributedRunError, match=r"(?s)rank 0 of 1 failed.*ValueError: boom from rank 0"):
        run_distributed(_fail_on_rank, 1, bad_rank=0)
    assert not dist.is_initialized() and not cpu_compat_active()


@pytest.mark.parametrize("sizes, match", [
    (dict(world_size=3, tp=2), r"world_size=3 is not divisible by tp\*pp\*cp = 2\*1\*1 = 2"),
    (dict(world_size=4, tp=2, pp=2, cp=2), r"tp\*pp\*cp = 2\*2\*2 = 8"),
    (dict(world_size=2, vpp=2), r"vpp=2 needs pp >= 2"),
    (dict(world_size=2, tp=0), r"tp=0 must be a positive int"),
])
def test_impossible_layouts_are_refused_before_spawning(sizes, match):
    with pytest.raises(ValueError, match=match):
        check_parallel_sizes(**sizes)
    world_size = sizes.pop("world_size")
    with pytest.raises(ValueError, match=match):
        run_distributed(_single, world_size, **sizes, scale=1.0)
