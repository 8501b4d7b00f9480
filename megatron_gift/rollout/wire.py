"""Scored rollout groups as one flat int32 tensor (what the rollout exchange sends), and back, losslessly.

Owns the wire format of rollout/colocated.py's exchange. Per group: a header [group_id, prompt length P,
responses N, flags (1: log-probs, 2: routed experts), L_1..L_N], with routed experts followed by [layers,
top_k, bytes per expert id]; then the prompt, the responses, the N float32 rewards, (if present) the float32
sampled-token log-probs, floats as their int32 bit patterns, and (if present) each response's routed experts
[P + L_i - 1, layers, top_k] as raw bytes (uint8, int16 or int32 ids) padded to whole int32 words. 4 bytes per
token (plus 4 per log-prob and layers * top_k * id bytes per routed token), no pickling. Token ids must fit
int32 (every vocabulary does). Never imports vLLM.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from megatron_gift.algo.packing import RolloutGroup


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32).contiguous().view(torch.int32)


_ROUTE_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
HAS_LOGPROBS, HAS_ROUTES = 1, 2


def _route_words(r: torch.Tensor) -> torch.Tensor:
    raw = r.contiguous().view(-1).view(torch.uint8)
    raw = torch.nn.functional.pad(raw, (0, -raw.numel() % 4))
    return raw.view(torch.int32)


def _route_dtype(g: RolloutGroup) -> torch.dtype:
    dtype = g.routed_experts[0].dtype
    if dtype not in _ROUTE_DTYPES.values():
        raise ValueError(f"group {g.group_id}: routed experts of dtype {dtype}; the wire takes uint8, int16 or int32")
    return dtype


def encode_groups(groups: Sequence[RolloutGroup]) -> torch.Tensor:
    """int32 [K] holding every group (an empty tensor for none)."""
    parts: List[torch.Tensor] = []
    for g in groups:
        has_lp, has_routes = g.rollout_logprobs is not None, g.routed_experts is not None
        lengths = [r.numel() for r in g.responses]
        flags = HAS_LOGPROBS * has_lp + HAS_ROUTES * has_routes
        parts.append(torch.tensor([g.group_id, g.prompt.numel(), g.size, flags] + lengths, dtype=torch.int32))
        if has_routes:
            _, layers, k = g.routed_experts[0].shape
            parts.append(torch.tensor([layers, k, _route_dtype(g).itemsize], dtype=torch.int32))
        parts += [g.prompt.to(torch.int32)] + [r.to(torch.int32) for r in g.responses] + [_bits(g.rewards)]
        if has_lp:
            parts += [_bits(lp) for lp in g.rollout_logprobs]
        if has_routes:
            parts += [_route_words(r.to(_route_dtype(g))) for r in g.routed_experts]
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
        gid, p, n, flags = values[i:i + 4]
        lengths = values[i + 4:i + 4 + n]
        i += 4 + n
        if flags & HAS_ROUTES:
            layers, k, itemsize = values[i:i + 3]
            i += 3
        prompt = take(p).long()
        responses = [take(m).long() for m in lengths]
        rewards = take(n).view(torch.float32).clone()
        logprobs = [take(m).view(torch.float32).clone() for m in lengths] if flags & HAS_LOGPROBS else None
        routes = None
        if flags & HAS_ROUTES:
            routes = []
            for m in lengths:
                count = (p + m - 1) * layers * k
                raw = take(-(-count * itemsize // 4)).view(torch.uint8)[:count * itemsize]
                routes.append(raw.clone().view(_ROUTE_DTYPES[itemsize]).view(p + m - 1, layers, k))
        out.append(RolloutGroup(group_id=gid, prompt=prompt, responses=responses, rewards=rewards,
                                rollout_logprobs=logprobs, routed_experts=routes))
    return out
