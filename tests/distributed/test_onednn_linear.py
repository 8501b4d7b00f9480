"""oneDNN GEMMs for Megatron's linear layers (mcore/onednn_linear.py).

- `OneDnnLinear` against float64 autograd: output, input / weight / bias gradients to 2e-6 of each tensor's
  largest value (float32 rounding), with and without bias, 3-d inputs, a frozen weight (no weight gradient),
  wider and narrower outputs (both orientations of the weight-gradient GEMM), few and many tokens (the weight
  gradient on torch.mm and on oneDNN), an empty microbatch.
- Fallbacks: bf16, sequence parallelism and deferred weight gradients call the layer's own implementation.
- A tiny GPTModel routed through oneDNN (every linear: qkv, proj, fc1, fc2, output layer) gives the loss and
  gradients of the same model on torch's GEMMs (1e-5), every routed layer really calls oneDNN, and at TP=2
  (column-parallel dgrad all-reduce) the assembled gradients equal one process's.
"""
from __future__ import annotations

import pytest
import torch

from megatron_gift.mcore import onednn_linear
from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.tiny_gpt import ATOL, RTOL, SEQ, VOCAB, _assemble_grads, _build_model, _config, _global_name, \
    _load, _rank_grads

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="torch built without oneDNN")


def _count_gemms(set_attr) -> list:
    """Wrap onednn_linear._gemm (through `set_attr`: monkeypatch.setattr or setattr) to record each call."""
    calls, gemm = [], onednn_linear._gemm
    set_attr(onednn_linear, "_gemm", lambda *a: calls.append(a[0].shape) or gemm(*a))
    return calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(48, 80), (80, 48)])  # the weight gradient's source: X^T, dY^T
@pytest.mark.parametrize("rows", [37, 370])  # x 3: the weight gradient on torch.mm, on oneDNN
def test_function_equals_float64_autograd(bias, frozen, n_in, n_out, rows, monkeypatch):
    assert (rows * 3 >= onednn_linear.WGRAD_MIN_TOKENS) == (rows == 370)
    calls = _count_gemms(monkeypatch.setattr)
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(rows, 3, n_in, generator=g, dtype=torch.float64)
    w64 = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / 7
    b64 = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(rows, 3, n_out, generator=g, dtype=torch.float64)
    leaves32 = [t.float().requires_grad_(not (frozen and i == 1)) for i, t in enumerate((x64, w64, b64))
                if t is not None]
    leaves64 = [t.clone().requires_grad_(not (frozen and i == 1)) for i, t in enumerate((x64, w64, b64))
                if t is not None]
    x, w, b = (leaves32 + [None])[:3]
    out = onednn_linear.OneDnnLinear.apply(x, w, b, False, None)
    ref = torch.nn.functional.linear(*leaves64)
    assert _rel(out, ref) < 2e-6
    out.backward(dy.float())
    ref.backward(dy)
    for got, want in zip(leaves32, leaves64):
        if want.requires_grad:
            assert _rel(got.grad, want.grad) < 2e-6
        else:
            assert got.grad is None
    assert ref.abs().max() > 1 and all(t.grad.abs().max() > 1 for t in leaves64 if t.requires_grad)
    assert len(calls) == 2 + (rows == 370 and not frozen)  # forward, dgrad (+ wgrad on oneDNN)


def test_empty_microbatch():
    x = torch.zeros(0, 1, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    out = onednn_linear.OneDnnLinear.apply(x, w, None, False, None)
    out.sum().backward()
    assert out.shape == (0, 1, 4) and torch.equal(w.grad, torch.zeros(4, 8)) and x.grad.shape == x.shape


@pytest.mark.parametrize("case", ["bf16", "sequence_parallel", "deferred_wgrad"])
def test_ineligible_calls_the_layers_own(case):
    calls = []

    def original(**kw):
        calls.append(kw)
        return "megatron"

    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    kw = dict(bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False, tp_group=None,
              sequence_parallel=case == "sequence_parallel",
              grad_output_buffer=[] if case == "deferred_wgrad" else None)
    x, w = torch.randn(2, 1, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype)
    assert onednn_linear._forward_impl(original, input=x, weight=w, **kw) == "megatron"
    assert len(calls) == 1 and calls[0]["input"] is x


def _step(rank, world_size, weights=None, route=True, count=False):
    from megatron.core import parallel_state as ps
    torch.manual_seed(5)
    model = _build_model(_config())
    if weights is None:
        weights = {_global_name(model, n): p.detach().clone() for n, p in model.named_parameters()}
    _load(model, weights)
    routed = onednn_linear.use_onednn_linears(model) if route else 0
    gemm = onednn_linear._gemm
    calls = _count_gemms(setattr) if count else []
    tokens = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(9))
    position_ids = torch.arange(SEQ).expand(4, SEQ)
    try:
        loss = model(tokens, position_ids, None, labels=tokens).float().mean()
        loss.backward()
    finally:
        onednn_linear._gemm = gemm
    return dict(loss=float(loss), grads=_rank_grads(model, "grad"), weights=weights, routed=routed, calls=len(calls),
                tp_rank=ps.get_tensor_model_parallel_rank())


def _both(rank, world_size):
    return [_step(rank, world_size, route=False), _step(rank, world_size, count=True)]


@pytest.mark.distributed
def test_model_equals_torch_gemms_and_tp2_equals_one_process():
    torch_run, onednn_run = run_distributed(_both, 1)[0]
    layers = 2 * 4 + 1  # per layer: qkv, proj, fc1, fc2; the output layer
    # forward and dgrad; 64 tokens < WGRAD_MIN_TOKENS: the weight gradient on torch.mm
    assert onednn_run["routed"] == layers and onednn_run["calls"] == 2 * layers
    assert onednn_run["loss"] == pytest.approx(torch_run["loss"], rel=1e-6)
    ref = _assemble_grads([torch_run])
    got = _assemble_grads([onednn_run])
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
    tp2 = run_distributed(_step, 2, tp=2, spawn=True, weights=onednn_run["weights"])
    assert all(r["routed"] == layers for r in tp2)
    got = _assemble_grads(tp2)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
