"""CPU compatibility layer: run megatron-core (0.16.x, 0.19.x) on CPU with the gloo backend.

Owns: the table of patches (`PATCHES`) that answer Megatron-Core's CUDA assumptions (what they are replaced
with: mcore/cpu_standins.py), the torch function mode that maps hard-coded CUDA devices to the CPU, and
`enable_cpu_compat()` / `cpu_compat_active()`. Only tests and the CPU demo use it.
Does not own: process groups or parallel state (mcore/parallel.py), process spawning (mcore/harness.py).

Rules this module keeps:
- It never activates when `torch.cuda.is_available()`: `enable_cpu_compat()` then warns and returns an
  inert handle (or raises with `strict=True`), so a GPU run cannot be silently rerouted to the CPU.
- Every patch is one `Patch` entry naming the Megatron-Core file/function it answers. A patch whose
  target attribute does not exist in the installed torch / megatron-core is skipped, not an error,
  so the same table serves 0.16.1 and 0.19.x.
- Disabling restores every original object exactly (tests check identity).

The "CUDA" random generator is the CPU default generator: on a CPU run every random op draws from
it, so Megatron's RNG tracker (`get_cuda_rng_tracker().fork()`) only has an effect if it swaps that
generator's state. Consequence: `model_parallel_cuda_manual_seed(seed)` also seeds the CPU generator.
"""
from __future__ import annotations

import importlib
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from megatron_gift.mcore.cpu_standins import (
    CPU as _CPU,
    cpu_get_rng_state,
    cpu_manual_seed,
    cpu_set_rng_state,
    current_device,
    DummyEvent,
    DummyStream,
    get_stream,
    noop,
    norm_new_with_sequence_parallel,
    splits_to_host,
    uneven_gather,
    uneven_reduce_scatter,
)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means cuda:<int> for torch factories and Tensor.to; bool is not a device.
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_PREFIX = "torch."


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA devices to the CPU in every torch call made while it is active.

    Answers hard-coded `device="cuda"` allocations, `.cuda()`/`.to("cuda")` moves, `pin_memory=True`
    (needs an accelerator) and `tensor.type() == 'torch.cuda.FloatTensor'` checks: a CPU tensor reports
    the CUDA type string, because on this path every tensor stands in for a CUDA tensor.
    Cost: about 4 us per torch call (measured on the 2-core CPU box: 1.9-2.8 us -> 6.4-6.7 us for a
    small add); it is pushed on the thread that called enable_cpu_compat().
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(func, args, kwargs)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


def _to(func, args, kwargs):
    args = tuple(_CPU if i > 0 and not isinstance(a, torch.dtype) and _is_cuda(a) else a
                 for i, a in enumerate(args))
    if "device" in kwargs and _is_cuda(kwargs["device"]):
        kwargs = dict(kwargs, device=_CPU)
    return func(*args, **kwargs)


def _cuda(func, args, kwargs):
    return args[0]  # like Tensor.cpu() on a CPU tensor: no copy


def _type(func, args, kwargs):
    out = func(*args, **kwargs)
    if len(args) == 1 and not kwargs and isinstance(out, str) and not out.startswith("torch.cuda."):
        return "torch.cuda." + out[len(_CUDA_TYPE_PREFIX):]
    return out


def _identity(func, args, kwargs):
    return args[0]


_SPECIAL = {
    torch.Tensor.to: _to,
    torch.Tensor.cuda: _cuda,
    torch.Tensor.type: _type,
    torch.Tensor.pin_memory: _identity,
}


def _checkpoint_under_mode(function: Any, distribute_saved_activations: bool, *args: Any) -> Any:
    """tensor_parallel.checkpoint whose recomputation (run by autograd in the backward pass, where the
    thread's torch function mode is not active) also maps CUDA devices to the CPU."""
    from megatron.core.tensor_parallel.random import checkpoint

    def run(*inner: Any) -> Any:
        with CudaToCpuMode():
            return function(*inner)

    return checkpoint(run, distribute_saved_activations, *args)


# ----------------------------------------------------------------------------- the patch table
@dataclass(frozen=True)
class Patch:
    """Replace `module.attr` by `replacement` while the layer is active; `reason` names the
    Megatron-Core code it answers (file:function). Skipped when `module.attr` does not exist, unless
    `create` (a global the module reads but never defines without Transformer Engine: set, then deleted).
    `attr` may be dotted (`Class.method`: the class's own attribute is replaced); with `wraps`, the
    replacement is a factory called with the original object."""

    module: str
    attr: str
    replacement: Any
    reason: str
    create: bool = False
    wraps: bool = False


_MISSING = object()  # original value of a created attribute: deleted again on release


_RNG = "megatron.core.tensor_parallel.random"

PATCHES: Tuple[Patch, ...] = (
    Patch("torch.cuda", "current_device", current_device,
          "allocations on device=torch.cuda.current_device(): pipeline_parallel/p2p_communication.py "
          "_communicate_shapes/_communicate buffers, models/common/embeddings/rotary_pos_embedding.py "
          "RotaryEmbedding.__init__, transformer/transformer_layer.py, optimizer/grad_scaler.py"),
    Patch("torch.cuda", "synchronize", noop,
          "pipeline_parallel/p2p_communication.py _communicate (after batch_isend_irecv), "
          "parallel_state.py, dist_checkpointing/strategies/async_utils.py + filesystem_async.py, timers.py"),
    Patch("torch.cuda", "current_stream", get_stream,
          "models/common/model_chunk_schedule_plan.py, fine_grained_callables.py record_stream"),
    Patch("torch.cuda", "default_stream", get_stream,
          "distributed/param_and_grad_buffer.py _ParamAndGradBucketGroup.start_grad_sync/finish_grad_sync "
          "(wait_stream with overlap_grad_reduce)"),
    Patch("torch.cuda", "Stream", DummyStream,
          "distributed/distributed_data_parallel.py DistributedDataParallel.__init__ communication_stream"),
    Patch("torch.cuda", "Event", DummyEvent,
          "models/common/model_chunk_schedule_plan.py, utils.py timers / straggler detector events"),
    Patch("torch.cuda", "get_rng_state", cpu_get_rng_state,
          "tensor_parallel/random.py CudaRNGStatesTracker.add: torch.cuda.get_rng_state(); "
          "rerun_state_machine.py RerunStateMachine._save_state"),
    Patch("torch.cuda", "set_rng_state", cpu_set_rng_state,
          "rerun_state_machine.py RerunStateMachine._restore_state (pairs with get_rng_state; on CPU torch "
          "the original is queued lazily and never applied)"),
    Patch("torch.cuda", "manual_seed", cpu_manual_seed,
          "tensor_parallel/random.py CudaRNGStatesTracker.add and model_parallel_cuda_manual_seed: "
          "torch.cuda.manual_seed (on CPU torch it is queued lazily and never applied)"),
    Patch(_RNG, "_get_cuda_rng_state", cpu_get_rng_state,
          "tensor_parallel/random.py _get_cuda_rng_state, used by CudaRNGStatesTracker.fork and "
          "CheckpointFunction (reads torch.cuda.random.get_rng_state, needs CUDA)"),
    Patch("megatron.core.tensor_parallel", "checkpoint", _checkpoint_under_mode,
          "activation recompute (recompute_granularity full / selective): transformer/transformer_block.py "
          "_checkpointed_forward, attention.py _checkpointed_attention_forward, transformer_layer.py; the "
          "backward re-runs the forward (get_default_causal_mask device='cuda') outside the function mode"),
    Patch(_RNG, "_set_cuda_rng_state", cpu_set_rng_state,
          "tensor_parallel/random.py _set_cuda_rng_state, used by fork / CheckpointFunction "
          "(torch.cuda._lazy_call: silently never runs without CUDA)"),
    Patch("megatron.core.transformer.moe.moe_utils", "te_general_gemm", None,
          "transformer/moe/moe_utils.py RouterGatingLinearFunction.forward/backward read the module global "
          "te_general_gemm, which is imported only with Transformer Engine (NameError in every MoE router)",
          create=True),
    Patch("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__", norm_new_with_sequence_parallel,
          "transformer/torch_norm.py WrappedTorchNorm asserts `not config.sequence_parallel` (the local spec's "
          "norms, used without Transformer Engine): MoE with TP x EP needs sequence parallelism", wraps=True),
    Patch("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim", uneven_gather,
          "tensor_parallel/mappings.py _gather_along_first_dim with output_split_sizes (MoE alltoall dispatcher "
          "with TP / expert TP > 1: ranks hold different token counts): gloo's all_gather needs equal sizes",
          wraps=True),
    Patch("megatron.core.tensor_parallel.mappings", "_reduce_scatter_along_first_dim", uneven_reduce_scatter,
          "tensor_parallel/mappings.py _reduce_scatter_along_first_dim with input_split_sizes (its backward): gloo "
          "has no uneven reduce_scatter", wraps=True),
    Patch("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu", splits_to_host,
          "transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize: split sizes "
          "become numpy arrays only when they were CUDA tensors; CPU tensors reach all_to_all_single (TypeError)"),
)

MODE_REASON = (
    "CudaToCpuMode: hard-coded device='cuda' tensors: transformer/utils.py get_default_causal_mask "
    "(every causal attention forward of the local spec), pipeline_parallel/schedules.py total_num_tokens, "
    "optimizer/optimizer.py found_inf/_dummy_overflow_buf/_scale_one, optimizer/clip_grads.py "
    "total_norm_cuda/dummy_overflow_buf/grad_norm, distributed/param_and_grad_buffer.py "
    "tmp_warmup_tensor, optimizer/distrib_optimizer.py .cuda(); tensor.type()=='torch.cuda.FloatTensor' "
    "in optimizer/optimizer.py Float16OptimizerWithFloat16Params, distrib_optimizer.py "
    "_build_model_and_main_param_groups, clip_grads.py count_zeros_fp32"
)


# ----------------------------------------------------------------------------- activation
class CpuCompatHandle:
    """Returned by `enable_cpu_compat()`; `disable()` (or leaving the `with` block) undoes it.

    `active` is False for the inert handle returned when CUDA is available. `applied` lists the
    patches actually installed (targets missing from this megatron-core/torch are not listed).
    """

    def __init__(self, active: bool, applied: Tuple[Patch, ...] = ()) -> None:
        self.active = active
        self.applied = applied
        self._closed = not active

    def disable(self) -> None:
        if self._closed:
            return
        self._closed = True
        _release()

    def __enter__(self) -> "CpuCompatHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disable()


class _State:
    lock = threading.Lock()
    refcount = 0
    originals: List[Tuple[Any, str, Any]] = []
    applied: Tuple[Patch, ...] = ()
    mode: Optional[CudaToCpuMode] = None
    log_filter: Optional[logging.Filter] = None


class _ForkWarningFilter(logging.Filter):
    """fork() compares the CPU generator before/after its body; with the CPU generator standing in for
    the CUDA one that comparison is meaningless (tensor_parallel/random.py CudaRNGStatesTracker.fork)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def cpu_compat_active() -> bool:
    """True while at least one enable_cpu_compat() handle is open."""
    return _State.refcount > 0


def enable_cpu_compat(strict: bool = False) -> CpuCompatHandle:
    """Install every patch in PATCHES and the CudaToCpuMode; returns a handle / context manager.

    Re-entrant: nested calls share the installation, which is undone when the last handle closes.
    The torch function mode is pushed on the calling thread (run Megatron from that thread).
    With CUDA available it refuses: warns and returns an inert handle, or raises if `strict`.
    """
    if torch.cuda.is_available():
        msg = "enable_cpu_compat(): CUDA is available, the CPU compatibility layer stays off"
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return CpuCompatHandle(active=False)
    with _State.lock:
        if _State.refcount == 0:
            _install()
        _State.refcount += 1
        return CpuCompatHandle(active=True, applied=_State.applied)


def _install() -> None:
    applied = []
    for patch in PATCHES:
        try:
            owner = importlib.import_module(patch.module)
        except ImportError:
            continue
        *path, attr = patch.attr.split(".")
        for name in path:
            owner = getattr(owner, name, None)
        if owner is None or (not hasattr(owner, attr) and not patch.create):
            continue
        original = vars(owner).get(attr, _MISSING) if isinstance(owner, type) else getattr(owner, attr, _MISSING)
        _State.originals.append((owner, attr, original))
        setattr(owner, attr, patch.replacement(original) if patch.wraps else patch.replacement)
        applied.append(patch)
    _State.applied = tuple(applied)
    _State.log_filter = _ForkWarningFilter()
    logging.getLogger(_RNG).addFilter(_State.log_filter)
    _State.mode = CudaToCpuMode()
    _State.mode.__enter__()


def _release() -> None:
    with _State.lock:
        _State.refcount -= 1
        if _State.refcount > 0:
            return
        if _State.mode is not None:
            _State.mode.__exit__(None, None, None)
            _State.mode = None
        for module, attr, original in reversed(_State.originals):
            if original is _MISSING:
                delattr(module, attr)
            else:
                setattr(module, attr, original)
        _State.originals = []
        _State.applied = ()
        logging.getLogger(_RNG).removeFilter(_State.log_filter)
        _State.log_filter = None


def describe_patches() -> str:
    """One line per patch: target and the Megatron-Core code it answers (for reports and docs)."""
    lines = [f"{p.module}.{p.attr}: {p.reason}" for p in PATCHES]
    return "\n".join(lines + [MODE_REASON])
