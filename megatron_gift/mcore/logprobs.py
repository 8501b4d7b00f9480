"""Token log-probs from vocab-parallel logits, and the context-parallel sequence-sum reducer.

Owns the two autograd functions the GIFT schedule needs on model-parallel outputs:
- `vocab_parallel_logprobs`: log softmax(logits / temperature)[target] from logits sharded over the
  vocabulary across the tensor-parallel group, without gathering the full vocabulary (three scalar
  all-reduces per token: max, sum of exp, target logit). Padded vocabulary rows (Megatron pads the
  vocab to a TP multiple) are excluded so the distribution equals the unpadded HF / vLLM one.
- `ContextParallelSum`: forward all-reduce over the context-parallel group, backward identity, for
  per-sequence sums whose tokens are split across CP ranks (every CP rank then holds the same loss and
  back-propagates into its own tokens only).
Process groups are passed in; None means "not parallel".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def _all_reduce(t: Tensor, op, group) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProb(torch.autograd.Function):
    """logits [..., V_local] (this rank's vocab slice starting at vocab_start) -> log-prob [...] of target."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, vocab_start: int, vocab_size: int, temperature: float, group):
        v_local = logits.shape[-1]
        work_dtype = torch.promote_types(logits.dtype, torch.float32)
        # One [.., V_local] working buffer, updated in place: scaled logits -> shifted -> exp -> softmax.
        work = logits.to(work_dtype, copy=True)
        if temperature != 1.0:
            work.div_(temperature)
        if vocab_start + v_local > vocab_size:  # this shard holds padding rows (host ints: no sync)
            work[..., max(0, vocab_size - vocab_start):] = float("-inf")
        global_max = _all_reduce(work.max(dim=-1).values, dist.ReduceOp.MAX, group)
        work.sub_(global_max.unsqueeze(-1))
        local_t = target - vocab_start
        in_shard = (local_t >= 0) & (local_t < v_local)
        local_t = local_t.clamp(0, v_local - 1)
        picked = work.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(torch.where(in_shard, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
        work.exp_()
        sum_exp = _all_reduce(work.sum(dim=-1), dist.ReduceOp.SUM, group)
        logprob = target_logit - sum_exp.log()
        work.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(work, local_t, in_shard)
        ctx.temperature, ctx.in_dtype = temperature, logits.dtype
        return logprob

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # d logp / d logits_j = (1[j == target] - softmax_j) / temperature; every TP rank owns its slice.
        softmax, local_t, in_shard = ctx.saved_tensors
        grad = softmax.neg()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), in_shard.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_out / ctx.temperature).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_logprobs(logits: Tensor, target: Tensor, *, vocab_size: int, temperature: float = 1.0,
                            tp_group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Log-probs [...] of `target` [...] under softmax(logits / temperature) over the true vocabulary.

    logits [..., V_local]: this tensor-parallel rank's contiguous vocab slice (rank r holds
    [r * V_local, (r + 1) * V_local)); vocab_size: the unpadded vocabulary (rows beyond it are padding).
    Computed in float32. The input is not modified.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rank = dist.get_rank(tp_group) if tp_group is not None and dist.get_world_size(tp_group) > 1 else 0
    return _VocabParallelLogProb.apply(logits, target, rank * logits.shape[-1], vocab_size, temperature, tp_group)


class ContextParallelSum(torch.autograd.Function):
    """All-reduce (sum) over the CP group in forward; identity in backward (the loss is replicated on CP ranks)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x.clone(), dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def context_parallel_reducer(cp_group: Optional[dist.ProcessGroup]):
    """The SequenceReducer for the losses: CP all-reduce when CP > 1, identity otherwise."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return lambda x: x
    return lambda x: ContextParallelSum.apply(x, cp_group)
