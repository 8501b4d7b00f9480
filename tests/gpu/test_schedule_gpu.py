"""The GIFT schedule on CUDA / NCCL: its finalised gradients equal plain PyTorch autograd of the same loss
(model logits -> log_softmax -> GIFTLoss) on the same model, float32. The same check runs on CPU via the
gloo harness in tests/distributed/test_schedule_autograd.py."""
import pytest

from tests.distributed.test_schedule_autograd import schedule_vs_autograd
from tests.gpu.nccl import single_nccl_rank


@pytest.mark.gpu
def test_schedule_matches_autograd_on_cuda():
    with single_nccl_rank(29531):
        worst = schedule_vs_autograd(0, 1, device="cuda")
    assert worst < 1e-4, worst
