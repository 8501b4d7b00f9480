"""Plain data types shared across layers (L0): what a loss consumes and what it returns.

This module owns the tensor contract between the packer / schedule (which build microbatches of whole
groups) and the losses in `megatron_gift.algo` (which reduce them). It holds no logic beyond shape
bookkeeping, so every layer may import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, Optional

import torch

Tensor = torch.Tensor

# Reduces per-sequence partial sums over the context-parallel group (forward all-reduce, backward
# identity). Identity when context parallelism is off.
SequenceReducer = Callable[[Tensor], Tensor]


def identity_reducer(x: Tensor) -> Tensor:
    """The reducer used without context parallelism."""
    return x


@dataclass
class LossInputs:
    """One microbatch of B whole groups' sequences, padded to T tokens.

    Sequences of one group are contiguous. `group_index` maps each sequence to a dense group slot
    0..num_groups-1 of this microbatch; `num_groups` is a host int so group reductions need no sync.

    mask            [B, T] 1.0 on response tokens that count, 0.0 on prompt and padding tokens.
    anchor_logprobs [B, T] GIFT anchor log-probs (reference model for anchor `ref`, the rollout policy
                    recomputed by the trainer for anchor `old`); GRPO's "old" log-probs. No grad.
    rewards         [B]    explicit rewards.
    group_index     [B]    int64, dense group slot of each sequence in this microbatch.
    num_groups      int    number of groups in this microbatch.
    group_ids       [B]    int64, global group (prompt) ids, used only to name groups in errors.
    ref_logprobs    [B, T] optional reference log-probs (GRPO's KL term).
    """

    mask: Tensor
    anchor_logprobs: Tensor
    rewards: Tensor
    group_index: Tensor
    num_groups: int
    group_ids: Optional[Tensor] = None
    ref_logprobs: Optional[Tensor] = None

    @property
    def num_sequences(self) -> int:
        return self.rewards.shape[0]

    def to(self, device: torch.device | str) -> "LossInputs":
        """Copy every tensor field to `device` (non-blocking where possible)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                moved[f.name] = value.to(device, non_blocking=True)
        return replace(self, **moved)


@dataclass
class LossOutput:
    """What a loss returns for one microbatch.

    loss_sum       scalar: sum of per-sequence loss terms of this microbatch (graph-attached).
    num_sequences  scalar tensor: the count loss_sum is normalised by (sequences; response tokens for the
                   token-mean aggregation of GRPO / DAPO); the schedule divides the sum over all
                   microbatches and data-parallel ranks by the sum of these, exactly once.
    metrics        name -> tensor [2] = (sum, weight); the reported value is sum/weight after summing
                   over microbatches and ranks. Tensors, never Python floats (no host sync).
    """

    loss_sum: Tensor
    num_sequences: Tensor
    metrics: Dict[str, Tensor] = field(default_factory=dict)


def metric(total: Tensor, weight: Tensor | float) -> Tensor:
    """Pack a (sum, weight) pair as a detached float tensor [2]."""
    total = total.detach().to(torch.float32).reshape(())
    weight = torch.as_tensor(weight, dtype=torch.float32, device=total.device).reshape(())
    return torch.stack([total, weight])


def is_max_metric(name: str) -> bool:
    """Metrics named *_max hold (max, 1) and combine by maximum instead of summing."""
    return name.endswith("_max")


def reduce_metrics(parts: list[Dict[str, Tensor]]) -> Dict[str, Tensor]:
    """Combine (sum, weight) metric pairs over microbatches (max for *_max); the caller divides at step end."""
    out: Dict[str, Tensor] = {}
    for part in parts:
        for name, pair in part.items():
            if name not in out:
                out[name] = pair.clone()
            elif is_max_metric(name):
                out[name] = torch.maximum(out[name], pair)
            else:
                out[name] = out[name] + pair
    return out
