"""The CPU compatibility layer: each patch does what its table entry says, enable/disable restores the
originals, and it refuses to activate when CUDA is reported available."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from megatron_gift.mcore import cpu_compat
from megatron_gift.mcore.cpu_compat import PATCHES, cpu_compat_active, enable_cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour (see tests/gpu)")


_ABSENT = object()


def _resolve(p):
    """The object a patch replaces (a class's own attribute for a dotted `Class.attr`)."""
    owner = importlib.import_module(p.module)
    *path, attr = p.attr.split(".")
    for name in path:
        owner = getattr(owner, name)
    return vars(owner).get(attr, _ABSENT) if isinstance(owner, type) else getattr(owner, attr, _ABSENT)


def _targets():
    """Patched objects by target; _ABSENT for a created global (te_general_gemm) while the layer is off."""
    return {(p.module, p.attr): _resolve(p) for p in PATCHES}


@pytest.fixture
def compat():
    with enable_cpu_compat() as handle:
        yield handle
    assert not cpu_compat_active()


def test_every_patch_names_its_megatron_site_and_applies_on_this_install():
    before = _targets()
    with enable_cpu_compat() as compat:
        _check_applied(compat, before)


def _check_applied(compat, before):
    assert compat.active
    for p in PATCHES:
        assert p.reason.strip(), f"patch {p.module}.{p.attr} has no reason"
    # megatron-core 0.16.1 and torch 2.13 have every target: none may be silently skipped here.
    assert {(p.module, p.attr) for p in compat.applied} == {(p.module, p.attr) for p in PATCHES}
    for p in PATCHES:
        obj = _targets()[(p.module, p.attr)]
        if p.wraps:  # a wrapper built around the original
            assert obj is not before[(p.module, p.attr)] and obj is not _ABSENT
        else:
            assert obj is p.replacement


def _norm_config(sequence_parallel):
    from types import SimpleNamespace
    return SimpleNamespace(layernorm_zero_centered_gamma=False, persist_layer_norm=False,
                           memory_efficient_layer_norm=False, normalization="RMSNorm",
                           sequence_parallel=sequence_parallel)


def test_torch_norms_build_under_sequence_parallelism_tagged_for_the_tp_reduction():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(_norm_config(True), 8)  # megatron-core as installed
    with enable_cpu_compat():
        config = _norm_config(True)
        norm = WrappedTorchNorm(config, 8, eps=1e-6)
        assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6 and norm.normalized_shape == (8,)
        assert config.sequence_parallel is True  # flipped only while the original builds
        assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
        plain = WrappedTorchNorm(_norm_config(False), 8)
        assert not any(hasattr(p, "sequence_parallel") for p in plain.parameters())
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(_norm_config(True), 8)  # restored


def test_disable_restores_originals_and_nesting_is_refcounted():
    before = _targets()
    outer = enable_cpu_compat()
    inner = enable_cpu_compat()
    inner.disable()
    assert cpu_compat_active() and torch.zeros(1, device="cuda").device.type == "cpu"
    outer.disable()
    outer.disable()  # idempotent
    assert not cpu_compat_active()
    after = _targets()
    assert all(after[k] is before[k] for k in before)
    assert before[("megatron.core.transformer.moe.moe_utils", "te_general_gemm")] is _ABSENT  # deleted again
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # the mode is gone: CPU torch refuses CUDA again


def test_refuses_when_cuda_reported_available(monkeypatch):
    before = _targets()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(RuntimeWarning, match="CUDA is available"):
        handle = enable_cpu_compat()
    assert not handle.active and not cpu_compat_active()
    assert all(_targets()[k] is before[k] for k in before)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        enable_cpu_compat(strict=True)
    handle.disable()  # inert handle: nothing to undo, must not underflow the refcount
    assert cpu_compat_active() is False and cpu_compat._State.refcount == 0


def test_cuda_allocations_and_moves_land_on_cpu(compat):
    dev = torch.cuda.current_device()
    made = [torch.zeros(2, device="cuda"), torch.tensor([1.0], device="cuda:0"), torch.empty(2, device=dev),
            torch.ones(2, device=torch.device("cuda")), torch.arange(3, device=0),
            torch.empty(2, pin_memory=True), torch.zeros(2).new_zeros(3, device="cuda"),
            torch.zeros(2).cuda(), torch.zeros(2).to("cuda"), torch.zeros(2).to(0),
            torch.zeros(2).to(device="cuda", dtype=torch.float64), torch.zeros(2).pin_memory()]
    assert [t.device.type for t in made] == ["cpu"] * len(made)
    assert made[-2].dtype == torch.float64 and torch.zeros(2).to(torch.int32).dtype == torch.int32
    x = torch.arange(4.0)
    y = x * 2 + 1  # ordinary ops still compute (the mode only rewrites devices)
    assert torch.equal(y, torch.tensor([1.0, 3.0, 5.0, 7.0]))


def test_tensor_type_strings_report_cuda(compat):
    # optimizer/optimizer.py, distrib_optimizer.py, clip_grads.py compare param.type() with these.
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # the conversion form still converts


def test_sync_stream_and_event_are_noops(compat):
    torch.cuda.synchronize()
    stream = torch.cuda.Stream(device=torch.cuda.current_device())
    stream.wait_stream(torch.cuda.default_stream())
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.stream(stream):
        t = torch.ones(2, device="cuda")
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    event.synchronize()
    assert event.query() and t.sum().item() == 2.0


def _seed_tracker(seed: int, tp_rank: int = 0):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    return get_cuda_rng_tracker()


def _draws(seed: int, tp_rank: int = 0):
    tracker = _seed_tracker(seed, tp_rank)
    before = torch.rand(3)
    with tracker.fork():
        forked = torch.rand(3)
    with tracker.fork():
        forked_again = torch.rand(3)  # continues the model-parallel stream, not a restart
    after = torch.rand(3)
    return before, forked, forked_again, after


def test_rng_tracker_fork_is_reproducible_and_separate(compat, caplog):
    before, forked, forked2, after = _draws(1234)
    # fork() warns when the CPU generator moved inside it; here that generator IS the forked one.
    assert "CPU RNG state changed" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip((before, forked, forked2, after), _draws(1234)))
    assert not torch.equal(forked, forked2)
    # The default stream is untouched by the forks: it continues as if they never happened.
    torch.manual_seed(1234)  # model_parallel_cuda_manual_seed seeds the "cuda" (= CPU) generator with seed
    plain = torch.rand(6)
    assert torch.equal(torch.cat([before, after]), plain)
    # The model-parallel stream is seeded with seed + 2718 + tp_rank (tensor_parallel/random.py).
    torch.manual_seed(1234 + 2718)
    assert torch.equal(torch.cat([forked, forked2]), torch.rand(6))
    assert not torch.equal(_draws(1234, tp_rank=1)[1], forked)


def test_cuda_rng_state_is_the_cpu_generator(compat):
    # rerun_state_machine.py saves / restores torch.cuda.get_rng_state() / set_rng_state().
    state = torch.cuda.get_rng_state()
    first = torch.rand(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(4), first)
    torch.cuda.manual_seed(99)
    seeded = torch.rand(4)
    torch.manual_seed(99)
    assert torch.equal(torch.rand(4), seeded)


def test_megatron_grad_clipping_runs_on_cpu_and_matches_torch(compat):
    """clip_grads.py: device='cuda' norm buffers and the 'torch.cuda.FloatTensor' assertion."""
    import torch.distributed as dist
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [p.grad.clone() for p in params]
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in ref))
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        norm = get_grad_norm_fp32([p.grad for p in params], norm_type=2, grad_stats_parallel_group=None)
    finally:
        dist.destroy_process_group()
    assert norm == pytest.approx(expected, rel=1e-6)
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    scale = 1.0 / (expected + 1e-6)  # clip_coeff as in clip_grads.py and torch.nn.utils.clip_grad_norm_
    for p, g in zip(params, ref):
        torch.testing.assert_close(p.grad, g * scale, atol=1e-6, rtol=1e-5)
