"""Stream the trained policy as Hugging Face tensors to every rank's colocated rollout engine.

Owns: unwrapping the training wrappers (DDP, Float16Module), forcing a parameter sync when the
distributed optimizer gathers parameters lazily, gathering tensor-parallel shards (every TP rank gets the
full tensor) and broadcasting each pipeline stage's tensors to the other stages, one tensor at a time,
so no rank holds a second full copy of the model beyond its engine's. Names and layouts come from
checkpoint/mapping.py through mcore/convert.py.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_gift.hf.arch import HFArch
from megatron_gift.mcore.convert import iter_model_as_hf
from megatron_gift.utils.device import compute_device

_DONE = "__end_of_stage__"


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def iter_policy_as_hf(model: List[torch.nn.Module], arch: HFArch, pg=None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields every (hf_name, full tensor) of the model on every rank, in the same order everywhere.

    Every rank must exhaust it: it all-gathers over the tensor-parallel group and broadcasts each stage's
    tensors over the pipeline group (each pipeline group, one per TP / CP / DP position, on its own).
    pg: the ProcessGroupCollection whose tp and pp groups are used (None: Megatron's parallel_state groups)."""
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)  # lazily gathered params (overlap_param_gather) made current
    pp_group = pg.pp if pg is not None else ps.get_pipeline_model_parallel_group()
    tp_group = pg.tp if pg is not None else None
    pp, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    if pp == 1:
        for chunk in model:
            yield from iter_model_as_hf(unwrap(chunk), arch, tp_group)
        return
    stage_ranks = dist.get_process_group_ranks(pp_group)
    for stage in range(pp):
        src = stage_ranks[stage]
        if stage == pp_rank:
            for chunk in model:
                for name, tensor in iter_model_as_hf(unwrap(chunk), arch, tp_group):
                    _broadcast_tensor(pp_group, src, name, tensor)
                    yield name, tensor
            _broadcast_meta(pp_group, src, (_DONE, None, None))
        else:
            while True:
                name, shape, dtype = _broadcast_meta(pp_group, src, None)
                if name == _DONE:
                    break
                buffer = torch.empty(shape, dtype=dtype, device=compute_device())
                dist.broadcast(buffer, src=src, group=pp_group)
                yield name, buffer


def _broadcast_tensor(group, src: int, name: str, tensor: torch.Tensor) -> None:
    """Name, shape and dtype as a small object, then the tensor itself (no pickling of the data)."""
    _broadcast_meta(group, src, (name, tuple(tensor.shape), tensor.dtype))
    dist.broadcast(tensor.detach().contiguous().to(compute_device()), src=src, group=group)


def _broadcast_meta(group, src: int, meta):
    box = [meta]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
