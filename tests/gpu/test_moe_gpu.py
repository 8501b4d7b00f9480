"""Mixture of experts on CUDA / NCCL (alltoall dispatch, SequentialMLP experts without Transformer Engine): the
load-balancing loss's router gradient equals plain torch, as tests/distributed/test_moe_aux_router.py checks
on CPU / gloo."""
import pytest

from tests.distributed.test_moe_aux_router import aux_router_check
from tests.gpu.nccl import single_nccl_rank


@pytest.mark.gpu
def test_moe_aux_loss_router_gradient_on_cuda():
    with single_nccl_rank(29533):
        diff, scale = aux_router_check(0, 1, device="cuda")
    print(f"cuda router aux gradient: max |diff| {diff:.2e}, max |ref| {scale:.2e}")
    assert scale > 1e-3 and diff <= 1e-4 * max(1.0, scale)
