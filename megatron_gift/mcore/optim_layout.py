"""The optimizer's non-tensor checkpoint state across expert layouts: an MoE checkpoint saved at one
expert-parallel size resumes at another.

megatron-core 0.16.1 (`get_megatron_optimizer`) puts the parameters Megatron marks expert-parallel
(`allreduce=False`, which its experts set only when expert_model_parallel_size > 1) into a second optimizer of
a ChainedOptimizer. A chain of one optimizer saves that optimizer's state dict as it is; a chain of two saves
{0: dense, 1: expert}. The per-parameter tensors (Adam moments, fp32 main params) are keyed by the model's
global parameter names in both (fully reshardable formats, no chain prefix), so they reshard across EP; the
common (non-tensor) part does not: the param groups (hyperparameters, the distributed optimizer's 'step') and
the plain optimizer's 'common_step' are stored per optimizer, and dist_checkpointing merged the saved
structure with the other layout's, failing with KeyError 'pre_wd_mult' in the optimizer's load.

Owns: `RemapOptimizerCommon`, the common-part load strategy that rewrites the checkpoint's optimizer entry
into the chain structure of the optimizer being loaded: every current param group takes the saved group with
the same identity (wd_mult, lr_mult, is_decoupled_lr; `is_expert_parallel` from the current group), and the
non-group state (common_step, sharding type, grad scaler) must be the same in every saved optimizer merged
into one. Anything that does not match is a `OptimizerLayoutError` naming the group or item.
Does not own: the tensors (dist_checkpointing reshards them), the model part, when to load (dist_ckpt.py).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List

import torch
from megatron.core.dist_checkpointing.strategies.base import LoadCommonStrategy
from megatron.core.dist_checkpointing.validation import verify_checkpoint_and_load_strategy

GROUP_IDENTITY = ("wd_mult", "lr_mult", "is_decoupled_lr")  # megatron's param_group_identifier_keys less EP
EXPERT_FLAG = "is_expert_parallel"


class OptimizerLayoutError(ValueError):
    """The saved optimizer state cannot be rewritten into this run's optimizer layout."""


def _entries(common_optimizer: Any) -> List[Dict[str, Any]]:
    """The saved chain as a list: {0: dense, 1: expert} (two or more optimizers) or one optimizer's dict."""
    if isinstance(common_optimizer, dict) and common_optimizer and all(isinstance(k, int) for k in common_optimizer):
        return [common_optimizer[k] for k in sorted(common_optimizer)]
    return [common_optimizer]


def _groups(entry: Dict[str, Any]) -> List[Dict[str, Any]]:
    """An optimizer entry's param groups: Float16 / distributed optimizers nest the torch state under 'optimizer'."""
    return entry["optimizer"]["param_groups"] if "optimizer" in entry else entry["param_groups"]


def _identity(group: Dict[str, Any]) -> tuple:
    return tuple(group[k] for k in GROUP_IDENTITY)


def _expert_flags(groups: List[Dict[str, Any]]) -> List[bool]:
    return [bool(g[EXPERT_FLAG]) for g in groups]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _without_groups(entry: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in entry.items() if k not in ("param_groups", "optimizer")}
    if "optimizer" in entry:
        out["optimizer"] = {k: v for k, v in entry["optimizer"].items() if k != "param_groups"}
    return out


def _saved_groups_by_identity(saved: List[Dict[str, Any]]) -> Dict[tuple, Dict[str, Any]]:
    by_identity: Dict[tuple, Dict[str, Any]] = {}
    for entry in saved:
        for group in _groups(entry):
            plain = {k: v for k, v in group.items() if k not in (EXPERT_FLAG, "params")}
            known = by_identity.setdefault(_identity(group), plain)
            if not _equal(known, plain):
                differ = sorted(k for k in set(known) | set(plain) if not _equal(known.get(k), plain.get(k)))
                raise OptimizerLayoutError(
                    f"optimizer param groups {dict(zip(GROUP_IDENTITY, _identity(group)))} of the dense and the "
                    f"expert optimizer differ in {differ}: they cannot become one group at this expert layout")
    return by_identity


def _merged_rest(saved: List[Dict[str, Any]]) -> Dict[str, Any]:
    rest = [_without_groups(e) for e in saved]
    for other in rest[1:]:
        if not _equal(rest[0], other):
            differ = sorted(k for k in set(rest[0]) | set(other) if not _equal(rest[0].get(k), other.get(k)))
            raise OptimizerLayoutError(f"optimizer state {differ} differs between the dense and the expert "
                                       f"optimizer: it cannot be carried to another expert layout")
    return rest[0]


def remap_optimizer_common(common_optimizer: Any, current: List[List[Dict[str, Any]]]) -> Any:
    """The checkpoint's common optimizer part in the structure of a chain whose optimizers have the param
    groups `current` (one list of torch param groups per chained optimizer). Unchanged when the saved chain
    has the same optimizers with the same expert flags (the same expert layout)."""
    saved = _entries(common_optimizer)
    if [_expert_flags(_groups(e)) for e in saved] == [_expert_flags(gs) for gs in current]:
        return common_optimizer
    by_identity, rest = _saved_groups_by_identity(saved), _merged_rest(saved)
    out = []
    for groups in current:
        entry = copy.deepcopy(rest)
        missing = [dict(zip(GROUP_IDENTITY, _identity(g))) for g in groups if _identity(g) not in by_identity]
        if missing:
            raise OptimizerLayoutError(f"the checkpoint has no optimizer param group {missing[0]} (saved groups: "
                                       f"{[dict(zip(GROUP_IDENTITY, k)) for k in by_identity]})")
        new_groups = [{**copy.deepcopy(by_identity[_identity(g)]), EXPERT_FLAG: g[EXPERT_FLAG]} for g in groups]
        if "optimizer" in entry:
            entry["optimizer"]["param_groups"] = new_groups
        else:
            entry["param_groups"] = new_groups
        out.append(entry)
    return out[0] if len(out) == 1 else dict(enumerate(out))


def current_param_groups(optimizer) -> List[List[Dict[str, Any]]]:
    """The torch param groups of each optimizer of a (chained) megatron optimizer."""
    return [opt.optimizer.param_groups for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


class RemapOptimizerCommon(LoadCommonStrategy):
    """The checkpoint's default common-part strategy, with its `key` entry (the optimizer) remapped into the
    chain structure of `optimizer` (see the module docstring)."""

    def __init__(self, ckpt_dir: str, optimizer, key: str = "optimizer"):
        _, self.inner = verify_checkpoint_and_load_strategy(str(ckpt_dir))
        self.current, self.key = current_param_groups(optimizer), key

    def load_common(self, checkpoint_dir):
        common = self.inner.load_common(checkpoint_dir)
        if self.key in common:
            common[self.key] = remap_optimizer_common(common[self.key], self.current)
        return common

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        return self.inner.load_sharded_objects(sharded_objects_state_dict, checkpoint_dir)

    def load_sharded_metadata(self, checkpoint_dir):
        return self.inner.load_sharded_metadata(checkpoint_dir)

    def check_backend_compatibility(self, loaded_backend):
        return self.inner.check_backend_compatibility(loaded_backend)

    def check_version_compatibility(self, loaded_version):
        return self.inner.check_version_compatibility(loaded_version)

    @property
    def can_handle_sharded_objects(self):
        return self.inner.can_handle_sharded_objects
