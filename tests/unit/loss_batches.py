"""Synthetic grouped batches for loss tests (float64 by default)."""
from __future__ import annotations

import torch

from megatron_gift.algo.types import LossInputs


def make_batch(group_sizes, seq_len=6, seed=0, dtype=torch.float64, rewards=None):
    """Random token log-probs (leaf, requires grad) and LossInputs for groups of the given sizes.

    Each sequence gets a random prompt length (masked out) and random padding at the end.
    """
    gen = torch.Generator().manual_seed(seed)
    b = sum(group_sizes)
    logprobs = (-torch.rand(b, seq_len, generator=gen, dtype=dtype) * 3).requires_grad_(True)
    anchor = -torch.rand(b, seq_len, generator=gen, dtype=dtype) * 3
    mask = torch.zeros(b, seq_len, dtype=dtype)
    for i in range(b):
        start = int(torch.randint(0, 2, (1,), generator=gen))
        end = int(torch.randint(start + 1, seq_len + 1, (1,), generator=gen))
        mask[i, start:end] = 1.0
    group_index = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    if rewards is None:
        rewards = torch.randint(0, 3, (b,), generator=gen).to(dtype)
    inputs = LossInputs(mask=mask, anchor_logprobs=anchor, rewards=torch.as_tensor(rewards, dtype=dtype),
                        group_index=group_index, num_groups=len(group_sizes),
                        group_ids=group_index + 100)
    return logprobs, inputs


def select_groups(logprobs, inputs: LossInputs, groups):
    """Sub-batch holding only the given group slots (re-densified), and the row indices taken."""
    rows = torch.cat([(inputs.group_index == g).nonzero()[:, 0] for g in groups])
    remap = torch.full((inputs.num_groups,), -1, dtype=torch.long)
    remap[torch.tensor(groups)] = torch.arange(len(groups))
    sub = LossInputs(mask=inputs.mask[rows], anchor_logprobs=inputs.anchor_logprobs[rows],
                     rewards=inputs.rewards[rows], group_index=remap[inputs.group_index[rows]],
                     num_groups=len(groups), group_ids=inputs.group_ids[rows])
    return logprobs[rows], sub, rows
