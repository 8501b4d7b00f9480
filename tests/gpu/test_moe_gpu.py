"""Mixture of experts on CUDA / NCCL (alltoall dispatch, SequentialMLP experts without Transformer Engine): the
load-balancing loss's router gradient equals plain torch, as tests/distributed/test_moe_aux_router.py checks
on CPU / gloo."""
import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.test_moe_aux_router import aux_router_check


@pytest.mark.gpu
def test_moe_aux_loss_router_gradient_on_cuda():
    from megatron_gift.mcore.parallel import destroy_parallel, initialize_parallel
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        initialize_parallel(seed=1234)
        diff, scale = aux_router_check(0, 1, device="cuda")
        print(f"cuda router aux gradient: max |diff| {diff:.2e}, max |ref| {scale:.2e}")
        assert scale > 1e-3 and diff <= 1e-4 * max(1.0, scale)
    finally:
        destroy_parallel()
        dist.destroy_process_group()
