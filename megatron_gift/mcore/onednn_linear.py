"""oneDNN GEMMs for Megatron's linear layers on CPU float32.

Owns: `OneDnnLinear` (autograd function: y = x W^T + b, dgrad = dY W, wgrad = dY^T X, each one call of
`torch.ops.mkldnn._linear_pointwise`, oneDNN's fp32 GEMM on plain weights) and `use_onednn_linears(model)`,
which points every Column/RowParallelLinear of a model (attention, MLP, experts, output layer) at it.
Does not own: the layers themselves, their parameters or state dicts (unchanged: checkpoints are the same).

Why: torch's float32 `matmul` on CPU calls MKL's BLAS, which takes a generic code path on non-Intel CPUs;
on the 2-core AMD EPYC (AVX-512) of CI, oneDNN runs the train phase's forward and dgrad GEMMs 1.9-2.3x
faster and the weight gradient 1.3-1.9x (hidden 256, ffn 688, 4096 tokens; below 1024 tokens the weight
gradient stays on torch.mm, where oneDNN's copies cost more than it saves; benchmarks/packing.py and
benchmarks/vs_trl.py measure the step). Results differ from torch's only in rounding (about 1e-6 of the
largest output, as between any two fp32 GEMM kernels; tests/distributed/test_onednn_linear.py checks
float64 references).

Taken only where it computes exactly what Megatron's `_forward_impl` computes: CPU float32 input and weight,
no sequence parallelism, no gradient-accumulation fusion, no deferred weight gradients; anything else calls
the layer's own `_forward_impl` (Megatron's autograd functions), so GPUs, bf16 and fp16 are untouched.
The dgrad all-reduce of a column-parallel layer (TP > 1) runs asynchronously under the weight gradient,
as in Megatron's function.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.distributed as dist


def available() -> bool:
    """oneDNN is compiled into this torch and its fp32 linear op is registered."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ w.T (+ bias) over x's last dimension, as a tensor of its own (not a view: Megatron's cross entropy
    edits the logits in place, which autograd forbids on a view made inside a custom function; torch.matmul
    folds the same way). oneDNN rejects an empty reduction; torch takes it."""
    if x.shape[-1] == 0:
        out = torch.matmul(x, w.t())
        return out if bias is None else out + bias
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], w.shape[0]))


# Below this many tokens the weight gradient stays on torch.mm: oneDNN's transposed-source copy and weight
# reorder then cost more than MKL's generic kernel saves (64-256 tokens, hidden 128: 0.5-1.0x; 1024 tokens:
# 0.9-1.7x; 4096: 1.3-1.9x on the CI box).
WGRAD_MIN_TOKENS = 1024


def _wgrad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dY^T X for dY [T, N], X [T, K]. oneDNN reads its source row-major (so the transposed source is
    copied) and reorders its weights anyway: the narrower of dY and X is made the source (fc1's wgrad at
    N = 1376, K = 256, 7000 tokens: 37 instead of 84 ms; MKL's torch.mm 74 ms)."""
    if dy.shape[0] < WGRAD_MIN_TOKENS:
        return dy.t().matmul(x)
    if dy.shape[1] <= x.shape[1]:
        return _gemm(dy.t(), x.t())
    return _gemm(x.t(), dy.t()).t().contiguous()


class OneDnnLinear(torch.autograd.Function):
    """Megatron's linear (no sequence parallelism) with oneDNN GEMMs; gradients only for inputs that need them."""

    @staticmethod
    def forward(ctx, input, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(input if weight.requires_grad else None, weight)  # frozen: no wgrad, as Megatron's
        ctx.use_bias = bias is not None
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.tp_group = tp_group
        return _gemm(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = handle = None
        if ctx.needs_input_grad[0]:
            grad_input = _gemm(grad_output, weight.t())
            if ctx.allreduce_dgrad:
                handle = dist.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = _wgrad(dy, input.reshape(-1, input.shape[-1]))
        if ctx.use_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.sum(dim=0)
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None


def _eligible(input: torch.Tensor, weight: torch.Tensor, kwargs: dict) -> bool:
    if input.device.type != "cpu" or input.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if kwargs.get("sequence_parallel") or kwargs.get("grad_output_buffer") is not None:
        return False
    return not (kwargs.get("gradient_accumulation_fusion") and hasattr(weight, "main_grad"))


def _forward_impl(original, input, weight, **kwargs: Any) -> torch.Tensor:
    """A layer's `_forward_impl`: oneDNN where eligible, else the layer's own (Megatron's) implementation."""
    if not _eligible(input, weight, kwargs):
        return original(input=input, weight=weight, **kwargs)
    allreduce = bool(kwargs.get("allreduce_dgrad"))
    return OneDnnLinear.apply(input, weight, kwargs.get("bias"), allreduce, kwargs.get("tp_group"))


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Route every Megatron Column/RowParallelLinear of `model` through oneDNN (where eligible, see module
    docstring); returns how many layers were routed. No-op (0) without oneDNN."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if not available():
        return 0
    routed = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and "_forward_impl" not in vars(module):
            module._forward_impl = functools.partial(_forward_impl, module._forward_impl)
            routed += 1
    return routed
