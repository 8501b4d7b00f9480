"""The `Loss` protocol: what the trainer and the schedule may ask of a loss (pure torch).

Owns the contract between a loss (algo/gift.py, algo/grpo.py, or a registered one) and its callers:
- `name`; `anchor`: "ref" (anchor log-probs from the frozen reference model) or "old" (from the policy
  that generated the rollouts, recomputed before the batch's first update);
- `needs_ref_logprobs`: the loss also reads `inputs.ref_logprobs` (the reference model's), e.g. GRPO's KL;
- `__call__(logprobs, inputs, reduce_seq) -> LossOutput` for one microbatch of whole groups.
An `AnalyticLoss` also gives the sequence log-ratios h, the loss from them and the analytic coefficients
c_j = dL/dh_j that the two-pass schedule back-propagates (mcore/schedule.py).
`check_loss` is run on every loss the registry builds, so a loss missing a member fails when the config
loads, not at step 1.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from megatron_gift.algo.types import LossInputs, LossOutput, SequenceReducer, identity_reducer

ANCHORS = ("ref", "old")


@runtime_checkable
class Loss(Protocol):
    name: str
    anchor: str
    needs_ref_logprobs: bool

    def __call__(self, logprobs: Tensor, inputs: LossInputs,
                 reduce_seq: SequenceReducer = identity_reducer) -> LossOutput: ...


@runtime_checkable
class AnalyticLoss(Loss, Protocol):
    """A loss L(h) of the sequence log-ratios h with analytic coefficients (what `two_pass` needs)."""

    def sequence_log_ratios(self, logprobs: Tensor, inputs: LossInputs,
                            reduce_seq: SequenceReducer = identity_reducer) -> Tensor: ...

    def from_log_ratios(self, h: Tensor, inputs: LossInputs) -> LossOutput: ...

    def coefficients(self, h: Tensor, inputs: LossInputs, num_total: Tensor | float) -> Tensor: ...


def check_loss(loss) -> Loss:
    """`loss`, after checking it follows the Loss protocol (a TypeError naming what is missing or wrong)."""
    missing = [m for m in ("name", "anchor", "needs_ref_logprobs", "__call__") if not hasattr(loss, m)]
    if missing:
        raise TypeError(f"loss {type(loss).__name__} lacks {', '.join(missing)} (the Loss protocol, algo/loss.py)")
    if loss.anchor not in ANCHORS:
        raise TypeError(f"loss '{loss.name}': anchor is {loss.anchor!r}, not one of {ANCHORS}")
    if not isinstance(loss.needs_ref_logprobs, bool):
        raise TypeError(f"loss '{loss.name}': needs_ref_logprobs must be a bool, got {loss.needs_ref_logprobs!r}")
    return loss


def needs_reference_model(loss: Loss) -> bool:
    """Whether a frozen copy of the initial policy must be built: the anchor, or the loss's own reference term."""
    return loss.anchor == "ref" or loss.needs_ref_logprobs


def has_coefficients(loss: Loss) -> bool:
    """Whether the loss can run under the two-pass schedule."""
    return isinstance(loss, AnalyticLoss)


def loss_count(loss: Loss, inputs: LossInputs) -> Tensor:
    """The count `loss` divides by for `inputs` (sequences, or response tokens for token-mean), known before any
    forward pass: every loss's count depends on the masks and rewards only, so it is read from a call on zero
    log-probs. The schedule needs it up front to weight Megatron's MoE aux loss (mcore/moe_aux.py)."""
    zeros = torch.zeros(inputs.mask.shape, dtype=torch.float32, device=inputs.mask.device)
    dry = replace(inputs, anchor_logprobs=zeros, ref_logprobs=None if inputs.ref_logprobs is None else zeros)
    return loss(zeros, dry).num_sequences.detach()
