"""Scored rollout groups as one flat int32 tensor (what the rollout exchange sends), and back, losslessly.

Owns the wire format of rollout/colocated.py's exchange. Per group: a header [group_id, prompt length P,
responses N, has_logprobs, L_1..L_N], then the prompt, the responses, the N float32 rewards and (if
present) the float32 sampled-token log-probs, floats as their int32 bit patterns. 4 bytes per token (plus
4 per log-prob), no pickling. Token ids must fit int32 (every vocabulary does). Never imports vLLM.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from megatron_gift.algo.packing import RolloutGroup


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous().view(torch.int32)


def encode_groups(groups: Sequence[RolloutGroup]) -> torch.Tensor:
    """int32 [K] holding every group (an empty tensor for none)."""
    parts: List[torch.Tensor] = []
    for g in groups:
        has_lp = g.rollout_logprobs is not None
        lengths = [r.numel() for r in g.responses]
        parts.append(torch.tensor([g.group_id, g.prompt.numel(), g.size, int(has_lp)] + lengths, dtype=torch.int32))
        parts += [g.prompt.to(torch.int32)] + [r.to(torch.int32) for r in g.responses] + [_bits(g.rewards)]
        if has_lp:
            parts += [_bits(lp) for lp in g.rollout_logprobs]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)


def decode_groups(flat: torch.Tensor) -> List[RolloutGroup]:
    """Inverse of encode_groups (int64 token ids, float32 rewards and log-probs)."""
    out: List[RolloutGroup] = []
    values = flat.tolist()
    i = 0

    def take(n: int) -> torch.Tensor:
        nonlocal i
        part = flat[i:i + n]
        i += n
        return part

    while i < len(values):
        gid, p, n, has_lp = values[i:i + 4]
        lengths = values[i + 4:i + 4 + n]
        i += 4 + n
        prompt = take(p).long()
        responses = [take(m).long() for m in lengths]
        rewards = take(n).view(torch.float32).clone()
        logprobs = [take(m).view(torch.float32).clone() for m in lengths] if has_lp else None
        out.append(RolloutGroup(group_id=gid, prompt=prompt, responses=responses, rewards=rewards,
                                rollout_logprobs=logprobs))
    return out
