"""The stand-ins the CPU compatibility layer (mcore/cpu_compat.py) puts in place of CUDA-only objects and
of Megatron-Core functions that assume NCCL.

Owns what each patch is replaced with: no-op synchronisation, dummy streams and events, the "CUDA" RNG state
as the CPU generator's, the MoE dispatcher's split sizes on the host and its uneven gathers /
reduce-scatters over gloo, and torch norms built for sequence-parallel models. Which Megatron-Core attribute
each replaces, and why, is the patch table in cpu_compat.py.
"""
from __future__ import annotations

from typing import Any

import torch

CPU = torch.device("cpu")


def current_device() -> torch.device:
    return CPU


def noop(*args: Any, **kwargs: Any) -> None:
    return None


class DummyEvent:
    """Stands in for torch.cuda.Event: CPU ops are synchronous, so every event is already complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "DummyEvent") -> float:
        return 0.0


class DummyStream:
    """Stands in for torch.cuda.Stream / current_stream() / default_stream(): one synchronous CPU stream."""

    device = CPU

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> DummyEvent:
        return event if event is not None else DummyEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_STREAM = DummyStream()


def get_stream(*args: Any, **kwargs: Any) -> DummyStream:
    return _STREAM


def cpu_get_rng_state(device: Any = "cuda", *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def splits_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """moe_utils.maybe_move_tensor_to_cpu for CPU tensors: the numpy conversion it does only for CUDA tensors
    (all_to_all_single's split sizes must be a list or array, not a tensor)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def uneven_gather(original: Any) -> Any:
    """tensor_parallel/mappings.py _gather_along_first_dim with output_split_sizes: gloo's all_gather needs equal
    sizes, so each part is padded to the largest, gathered, and cut back (the equal-size path is unchanged)."""
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        most = max(sizes)
        padded = input_.new_zeros((most,) + tuple(input_.shape[1:]))
        padded[:input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)
    return gather


def uneven_reduce_scatter(original: Any) -> Any:
    """tensor_parallel/mappings.py _reduce_scatter_along_first_dim with input_split_sizes (the backward of the
    uneven gather): gloo has no uneven reduce_scatter, so the whole tensor is summed and this rank's rows kept."""
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[:group.rank()])
        return total[start:start + sizes[group.rank()]].contiguous()
    return reduce_scatter


# ----------------------------------------------------------------------------- device mapping mode


def norm_new_with_sequence_parallel(original: Any) -> Any:
    """WrappedTorchNorm.__new__ that also builds norms for sequence-parallel models.

    A norm is per token, so under sequence parallelism it runs unchanged on this rank's part of the
    sequence; its weight then gets a partial gradient on every tensor-parallel rank, which Megatron sums
    over TP for parameters tagged `sequence_parallel` (distributed/finalize_model_grads.py
    _allreduce_non_tensor_model_parallel_grads), as Transformer Engine's norms are tagged."""
    build = original.__func__ if isinstance(original, staticmethod) else original

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        if not getattr(config, "sequence_parallel", False):
            return build(cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        config.sequence_parallel = False  # the original asserts it off; everything else it checks stays
        try:
            norm = build(cls, config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(__new__)
