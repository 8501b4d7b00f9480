"""The GIFT schedule on CUDA / NCCL: its finalised gradients equal plain PyTorch autograd of the same loss
(model logits -> log_softmax -> GIFTLoss) on the same model, float32. The same check runs on CPU via the
gloo harness in tests/distributed/test_schedule_autograd.py."""
import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed.test_schedule_autograd import schedule_vs_autograd


@pytest.mark.gpu
def test_schedule_matches_autograd_on_cuda():
    from megatron_gift.mcore.parallel import destroy_parallel, initialize_parallel
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        initialize_parallel(seed=1234)
        worst = schedule_vs_autograd(0, 1, device="cuda")
        assert worst < 1e-4, worst
    finally:
        destroy_parallel()
        dist.destroy_process_group()
