"""Stream the trained policy as Hugging Face tensors to the rank that feeds the rollout engine.

Owns: unwrapping the training wrappers (DDP, Float16Module), forcing a parameter sync when the
distributed optimizer gathers parameters lazily, and moving every pipeline stage's tensors to the
replica leader (pipeline rank 0, tensor rank 0) one tensor at a time, so no rank holds a second full
copy of the model. Names and layouts come from checkpoint/mapping.py through mcore/convert.py.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_gift.checkpoint.hf_arch import HFArch
from megatron_gift.mcore.convert import iter_model_as_hf

_DONE = "__end_of_stage__"


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def iter_policy_as_hf(model: List[torch.nn.Module], arch: HFArch) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yields (hf_name, full tensor) on the replica leader; every rank of the replica must exhaust it.

    Other ranks yield nothing but take part in the tensor-parallel gathers and pipeline sends.
    """
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)  # lazily gathered params (overlap_param_gather) made current
    tp_rank = ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    pp_group = ps.get_pipeline_model_parallel_group()
    first = dist.get_process_group_ranks(pp_group)[0] if pp > 1 else None
    for stage in range(pp):
        if stage == pp_rank:
            for chunk in model:
                for name, tensor in iter_model_as_hf(unwrap(chunk), arch):
                    if stage == 0 and tp_rank == 0:
                        yield name, tensor
                    elif tp_rank == 0:
                        _send(pp_group, (name, tensor.cpu()), src=dist.get_process_group_ranks(pp_group)[stage])
            if stage > 0 and tp_rank == 0:
                _send(pp_group, (_DONE, None), src=dist.get_process_group_ranks(pp_group)[stage])
        elif pp_rank == 0 and tp_rank == 0:
            src = dist.get_process_group_ranks(pp_group)[stage]
            while True:
                name, tensor = _send(pp_group, None, src=src)
                if name == _DONE:
                    break
                yield name, tensor
        elif tp_rank == 0 and pp_rank != stage and first is not None:
            # Other stages' tensor-rank-0 processes are in the same pipeline group: they receive and drop.
            src = dist.get_process_group_ranks(pp_group)[stage]
            while _send(pp_group, None, src=src)[0] != _DONE:
                pass


def _send(group, obj, src: int):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
