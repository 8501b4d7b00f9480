"""On a CUDA machine the CPU compatibility layer stays off: enable_cpu_compat() refuses, every torch.cuda
function and Megatron RNG helper is the original, CUDA tensors stay on the GPU, Megatron's RNG tracker
drives the real CUDA generator; the gloo harness still runs its ranks as CPU-only processes."""
from __future__ import annotations

import importlib

import pytest
import torch

from megatron_gift.mcore.cpu_compat import PATCHES, cpu_compat_active, enable_cpu_compat

pytestmark = pytest.mark.gpu


def _targets():
    out = {}
    for p in PATCHES:
        module = importlib.import_module(p.module)
        if hasattr(module, p.attr):
            out[(p.module, p.attr)] = getattr(module, p.attr)
    return out


def test_enable_refuses_and_leaves_cuda_untouched():
    before = _targets()
    assert ("torch.cuda", "current_device") in before
    with pytest.warns(RuntimeWarning, match="CUDA is available"):
        handle = enable_cpu_compat()
    assert not handle.active and not cpu_compat_active()
    after = _targets()
    assert all(after[k] is before[k] for k in before)
    assert all(after[(p.module, p.attr)] is not p.replacement for p in PATCHES if (p.module, p.attr) in after)
    assert isinstance(torch.cuda.current_device(), int)
    x = torch.zeros(2, device="cuda")
    assert x.device.type == "cuda" and x.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2).type() == "torch.FloatTensor"  # no function mode pushed
    with pytest.raises(RuntimeError, match="CUDA is available"):
        enable_cpu_compat(strict=True)
    handle.disable()
    assert not cpu_compat_active()


def test_megatron_rng_tracker_uses_the_cuda_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draws():
        model_parallel_cuda_manual_seed(1234, tp_rank=0, ep_rank=0, etp_rank=0)
        with get_cuda_rng_tracker().fork():
            return torch.rand(4, device="cuda").cpu()

    cpu_state = torch.get_rng_state()
    first = draws()
    assert torch.equal(first, draws())
    assert torch.equal(torch.get_rng_state(), cpu_state)  # the CPU generator is not the CUDA one here


def _rank_view(rank: int, world_size: int):
    return dict(cuda=torch.cuda.is_available(), compat=cpu_compat_active(),
                device=torch.zeros(1, device="cuda").device.type)


def test_harness_ranks_are_cpu_processes_on_a_gpu_host():
    from megatron_gift.mcore.testing.harness import run_distributed
    before = _targets()
    (out,) = run_distributed(_rank_view, 1, timeout=120)
    assert out == dict(cuda=False, compat=True, device="cpu")
    with pytest.raises(RuntimeError, match="sees CUDA"):
        run_distributed(_rank_view, 1, spawn=False)
    assert all(_targets()[k] is before[k] for k in before) and not cpu_compat_active()
