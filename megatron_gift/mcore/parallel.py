"""Megatron parallel state: initialise and destroy it for given TP / PP / CP / DP (and virtual PP).

Owns: validating the parallel sizes against the world size (readable error), the call to
`parallel_state.initialize_model_parallel`, seeding Megatron's model-parallel RNG tracker, and teardown.
Does not own: torch.distributed start-up (the caller or mcore/harness.py) and the CPU compatibility
layer (mcore/cpu_compat.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed


@dataclass(frozen=True)
class ParallelSizes:
    """Parallel layout of a world: world_size == tp * pp * cp * dp; the experts of an MoE model are laid out
    over the same ranks as etp * ep * edp * pp (Megatron's expert grid: ep x etp must divide tp x cp x dp)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    ep: int = 1
    etp: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)


def check_parallel_sizes(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1,
                         vpp: Optional[int] = None, ep: int = 1, etp: int = 1) -> ParallelSizes:
    """Validate a layout and return it; raises ValueError naming the offending size."""
    for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep), ("etp", etp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"parallel size {name}={value!r} must be a positive int")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world_size={world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
            f"the data-parallel size would be {world_size / model_parallel:g}")
    if vpp is not None:
        if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
            raise ValueError(f"virtual pipeline size vpp={vpp!r} must be a positive int or None")
        if pp < 2:
            raise ValueError(f"virtual pipeline size vpp={vpp} needs pp >= 2 (got pp={pp})")
    if (world_size // pp) % (ep * etp):
        # megatron.core.parallel_state.initialize_model_parallel: world % (etp * ep * pp) == 0.
        raise ValueError(f"ep*etp = {ep}*{etp} must divide the ranks of one pipeline stage, tp*cp*dp = "
                         f"{world_size // pp} (world_size={world_size}, pp={pp})")
    return ParallelSizes(world_size=world_size, tp=tp, pp=pp, cp=cp, vpp=vpp, ep=ep, etp=etp)


def initialize_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None,
                        seed: Optional[int] = None, ep: int = 1, etp: int = 1) -> ParallelSizes:
    """Initialise Megatron's parallel state over the default process group (must already exist).

    With `seed`, also seeds the model-parallel RNG tracker (`model_parallel_cuda_manual_seed`), which
    Megatron needs even with dropout 0; on CPU this requires the compatibility layer to be active.
    """
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel(): torch.distributed is not initialised; "
                           "call torch.distributed.init_process_group first (or use mcore.harness)")
    sizes = check_parallel_sizes(dist.get_world_size(), tp, pp, cp, vpp, ep, etp)
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("initialize_parallel(): Megatron parallel state is already initialised; "
                           "call destroy_parallel() first")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    if seed is not None:
        model_parallel_cuda_manual_seed(seed)
    return sizes


def destroy_parallel() -> None:
    """Tear down Megatron's parallel state (safe to call when it was never initialised)."""
    parallel_state.destroy_model_parallel()
