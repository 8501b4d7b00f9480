"""Shared checks for conversion tests: full-vocab logits of a Megatron GPTModel on any TP / PP layout.

Runs inside an initialised parallel state (single process or harness workers). PP forward is done by
hand with blocking p2p between adjacent stages (forward only), so the check does not depend on the
training schedule.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def full_logits(model, ids: torch.Tensor, hidden_size: int) -> Optional[torch.Tensor]:
    """ids [b, s] -> logits [b, s, padded_vocab] on the last PP stage (gathered over TP); None elsewhere."""
    b, s = ids.shape
    device = next(model.parameters()).device  # CUDA on a GPU host, CPU under the compat layer
    ids = ids.to(device)
    pos = torch.arange(s, device=device)[None].expand(b, -1)
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if pp_rank > 0:
            recv = torch.empty(s, b, hidden_size, device=device)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        out = model(ids if pp_rank == 0 else None, pos, None)
        if pp_rank < pp_size - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out.float().cpu()


def tokens(vocab: int, b: int = 2, s: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g)
