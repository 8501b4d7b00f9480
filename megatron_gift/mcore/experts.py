"""Expert parameters of Megatron MoE layers: local -> global expert numbers, gathered over ETP and EP.

Owns: recognising an expert weight by name in either spec (SequentialMLP `...mlp.experts.local_experts.<j>.
linear_fc1.weight`, TEGroupedMLP `...mlp.experts.linear_fc1.weight<j>`), and turning this rank's shard of it
into full tensors of every expert under full-model (global) names: all-gathered over the expert tensor-parallel
group (fc1 column-parallel with each rank holding [gate_shard; up_shard], fc2 row-parallel) and then over the
expert-parallel group (rank r of EP holds experts r*E/EP .. (r+1)*E/EP - 1).
Does not own: the HF names (hf/mapping.py) or the dense TP gather (mcore/convert.py).
"""
from __future__ import annotations

import re
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_LOCAL = re.compile(r"^(?P<pre>.*\.mlp\.experts\.local_experts\.)(?P<j>\d+)(?P<post>\.linear_fc(?P<fc>[12])\.weight)$")
_GROUPED = re.compile(r"^(?P<pre>.*\.mlp\.experts\.linear_fc(?P<fc>[12])\.weight)(?P<j>\d+)(?P<post>)$")


def _match(name: str) -> Optional[re.Match]:
    return _LOCAL.match(name) or _GROUPED.match(name)


def is_expert_param(name: str) -> bool:
    return _match(name) is not None


def _gather(p: torch.Tensor, group, size: int) -> list:
    parts = [torch.empty_like(p) for _ in range(size)]
    dist.all_gather(parts, p.detach().contiguous(), group=group)
    return parts


def _gather_etp(p: torch.Tensor, fc: str) -> torch.Tensor:
    size = ps.get_expert_tensor_parallel_world_size()
    if size == 1:
        return p.detach()
    parts = _gather(p, ps.get_expert_tensor_parallel_group(), size)
    if fc == "2":
        return torch.cat(parts, dim=1)
    halves = [torch.chunk(x, 2, dim=0) for x in parts]  # SwiGLU: [gate_shard; up_shard] per rank
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def gather_expert(name: str, p: torch.Tensor, num_experts: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """This rank's expert weight -> (global name, full tensor) for the same local slot on every EP rank.

    Every rank of the expert tensor- and expert-parallel groups must call it for the same parameters in
    the same order (all ranks hold the same number of local experts)."""
    m = _match(name)
    full = _gather_etp(p, m.group("fc"))
    ep = ps.get_expert_model_parallel_world_size()
    local = num_experts // ep
    parts = [full] if ep == 1 else _gather(full, ps.get_expert_model_parallel_group(), ep)
    j = int(m.group("j"))
    for r, t in enumerate(parts):
        yield f"{m.group('pre')}{r * local + j}{m.group('post')}", t
