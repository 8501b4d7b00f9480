"""Megatron side of training checkpoints: model + optimizer as one distributed checkpoint, RNG states.

Owns: the sharded state dict of a training run (every model chunk and the Megatron optimizer, including
distributed-optimizer shards), saving it synchronously or asynchronously (megatron.core's async request
run by an `AsyncCallsQueue`), loading it into a model / optimizer of ANY TP / PP / DP layout, the
"plain" (non-sharded) items that travel in the checkpoint's common part (LR scheduler, sampler, step),
and capturing / restoring this rank's random generators (python, numpy, torch CPU, CUDA when present,
Megatron's tensor-parallel RNG tracker).
Does not own: directories, markers, retention and metadata (checkpoint/manager.py), what the trainer puts
into the common part (trainer.py).

Layout independence: model tensors are stored as global tensors (Megatron's ShardedTensors); the plain
optimizer's state follows the model's sharding; the distributed optimizer uses the `fully_reshardable`
format (per-parameter state gathered on DP rank 0 when saving), so a checkpoint resumes under another
TP / PP / DP layout, and an MoE checkpoint under another expert-parallel size (mcore/optim_layout.py). `dp_reshardable` (no gather, faster at scale) can be chosen when the TP / PP layout
never changes.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_gift.mcore.model import build_gpt_model
from megatron_gift.mcore.optim_layout import RemapOptimizerCommon
from megatron_gift.mcore.weight_sync import unwrap

OPTIM_SHARDING = "fully_reshardable"


def _chunk_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"  # Megatron-LM's names (model0, model1, ... with VPP)


def training_sharded_state_dict(model: List[torch.nn.Module], optimizer, is_loading: bool,
                                optim_sharding: str = OPTIM_SHARDING) -> Dict[str, Any]:
    """{'model' (or model0..): chunk state, 'optimizer': optimizer state} as Megatron sharded objects."""
    state: Dict[str, Any] = {}
    for i, chunk in enumerate(model):
        if len(model) > 1:
            ps.set_virtual_pipeline_model_parallel_rank(i)
        state[_chunk_key(i, len(model))] = unwrap(chunk).sharded_state_dict()  # keys without wrapper prefixes
    if len(model) > 1:
        ps.set_virtual_pipeline_model_parallel_rank(0)
    # The optimizer finds each parameter's sharded tensor in the model part (by parameter identity).
    state["optimizer"] = optimizer.sharded_state_dict(
        dict(state), is_loading=is_loading, metadata={"distrib_optim_sharding_type": optim_sharding,
                                                 "chained_optim_avoid_prefix": True})
    return state


def _dp_cp_group(pg=None):
    """The data-parallel x context-parallel group: pg.dp_cp of a ProcessGroupCollection, else parallel_state's."""
    return pg.dp_cp if pg is not None else ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy(parallel: bool, pg=None):
    strategy = get_default_save_sharded_strategy()
    group = _dp_cp_group(pg)
    if parallel and dist.get_world_size(group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def check_checkpointable(model: List[torch.nn.Module], optimizer) -> None:
    """Refuse, before training starts, a set-up whose checkpoints megatron-core 0.16.1 writes wrongly.

    Distributed optimizer + pipeline parallelism + tied embeddings: a `fully_reshardable` checkpoint written
    under PP=2 held the tied embedding's fp32 main copy and Adam moments shifted by one row (hidden_size
    elements) against the weights (tests/distributed/test_checkpoint_reshard.py found it; the training
    itself is unaffected). Such a checkpoint would corrupt the embedding on resume, so the run is refused.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    distributed = any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))
    tied = any(getattr(unwrap(c), "share_embeddings_and_output_weights", False) for c in model)
    if distributed and tied and ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError(
            "checkpoints of a distributed optimizer with pipeline parallelism and tied embeddings are written "
            "wrongly by megatron-core 0.16.1 (tied embedding optimizer state misaligned): use "
            "parallel.use_distributed_optimizer=false, parallel.pp=1, or a model with untied embeddings")


def save_training_state(model: List[torch.nn.Module], optimizer, plain: Dict[str, Any], ckpt_dir: Path,
                        async_save: bool = False, optim_sharding: str = OPTIM_SHARDING, pg=None):
    """Write model + optimizer (sharded) and `plain` (common part, rank 0) into the EXISTING empty `ckpt_dir`.

    All ranks call it. Returns None, or with `async_save` the megatron AsyncRequest that writes the
    tensors (schedule it with `AsyncSaver`); its finalisation writes dist-checkpointing's metadata.json.
    pg: the run's ProcessGroupCollection (its dp_cp group shares the writing; None: parallel_state's).
    """
    state = training_sharded_state_dict(model, optimizer, is_loading=False, optim_sharding=optim_sharding)
    overlap = set(state) & set(plain)
    if overlap:
        raise ValueError(f"checkpoint plain items clash with sharded keys: {sorted(overlap)}")
    state.update(plain)
    writer_helper_dies_with_parent()
    return dist_checkpointing.save(state, str(ckpt_dir), sharded_strategy=_save_strategy(True, pg),
                                   async_sharded_save=async_save)


def load_training_state(model: List[torch.nn.Module], optimizer, ckpt_dir: Path,
                        optim_sharding: str = OPTIM_SHARDING, pg=None) -> Dict[str, Any]:
    """Load model + optimizer from `ckpt_dir` into this layout; returns the plain (common) items."""
    _allocate_distributed_optimizer_state(optimizer)
    state = training_sharded_state_dict(model, optimizer, is_loading=True, optim_sharding=optim_sharding)
    strategy = get_default_load_sharded_strategy(str(ckpt_dir))
    group = _dp_cp_group(pg)
    if dist.get_world_size(group) > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, group)
    common = RemapOptimizerCommon(str(ckpt_dir), optimizer)  # an MoE checkpoint of another expert layout
    loaded = dist_checkpointing.load(state, str(ckpt_dir), sharded_strategy=strategy, common_strategy=common)
    for i, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(loaded.pop(_chunk_key(i, len(model))), strict=True)
    with torch.no_grad(), _torch_adam_step_shim(optimizer):  # the optimizer copies into parameters
        optimizer.load_state_dict(loaded.pop("optimizer"))
    return loaded


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a not-yet-stepped distributed optimizer its torch Adam state (zeros; the checkpoint overwrites it).

    megatron-core 0.16.1 `DistributedOptimizer.state_dict()` (called when building the state dict to
    load into) asserts that the torch Adam states hold one common 'step' when neither TE nor apex is
    installed, which fails on an optimizer that has no state yet (every fresh run that resumes).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or len(opt.optimizer.state) > 0:
            continue
        if not isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # TE / apex fused Adam: megatron's own state handling applies
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                opt.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                          "exp_avg_sq": torch.zeros_like(p)}


@contextlib.contextmanager
def _torch_adam_step_shim(optimizer) -> Iterator[None]:
    """Let megatron-core 0.16.1 load `fully_reshardable` distributed-optimizer state into torch Adam.

    Without TE / apex, DistributedOptimizer.load_state_dict first puts the common 'step' into every torch
    Adam state, then `_set_main_param_and_optimizer_states` copies each key of that state from the
    checkpoint tensors, which (by design) carry no 'step': KeyError. The shim keeps the step already set.
    Megatron also puts ONE step tensor object into every parameter's state there; torch Adam increments
    each parameter's step in place, so a shared tensor would advance once per parameter per update and
    skew the bias correction (seen as a 2% loss difference two steps after resuming): each parameter
    gets its own copy on exit. Instance-level and undone on exit; inert for the plain optimizer and for
    TE / apex optimizers.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and isinstance(opt.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            original = opt._set_main_param_and_optimizer_states

            def keep_step(model_param, tensors, _opt=opt, _orig=original):
                if "step" not in tensors:
                    group_index, group_order = _opt.model_param_group_index_map[model_param]
                    state = _opt.optimizer.state[_opt.optimizer.param_groups[group_index]["params"][group_order]]
                    if "step" in state:
                        tensors = {**tensors, "step": state["step"]}
                return _orig(model_param, tensors)

            opt._set_main_param_and_optimizer_states = keep_step
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method
    for opt in patched:
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def canonical_checkpoint_tensors(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint as a full (unsharded) tensor, by key (nested keys dotted).

    Layout-free view used to compare checkpoints written under different layouts (tests, tools);
    one process (joins a world of one when no process group exists), loads everything into memory.
    """
    from megatron_gift.mcore.convert import single_process_parallel_state

    with single_process_parallel_state():
        loaded = dist_checkpointing.load_plain_tensors(str(ckpt_dir))
    return {k: v for k, v in _flat_items(loaded) if isinstance(v, torch.Tensor)}


def _flat_items(tree: Any, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_items(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat_items(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


class AsyncSaver:
    """Runs megatron async save requests and their finalisation; a failed write raises, never passes silently.

    `submit(request, finalize, what)`: start writing (all ranks); `finalize` runs on every rank once every
    rank's writer finished (after megatron's own finalisation, e.g. its metadata.json). `poll(blocking)`:
    finalise what is done (all ranks must call it at the same points). A writer process that failed makes
    `poll` raise AsyncSaveError naming `what` (megatron raises torch's CheckpointException, a BaseException
    that `except Exception` would not even see).
    """

    def __init__(self) -> None:
        self._queue = AsyncCallsQueue(persistent=False)
        self._what: List[str] = []

    def submit(self, request, finalize: Callable[[], None], what: str = "checkpoint") -> None:
        request.add_finalize_fn(finalize)
        self._queue.schedule_async_request(request)
        self._what.append(what)

    @property
    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls()

    def poll(self, blocking: bool = False) -> List[int]:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointException as exc:
            what = self._what[0] if self._what else "checkpoint"
            raise AsyncSaveError(f"asynchronous save of {what} failed (it is not a complete checkpoint and is "
                                 f"never resumed from): {exc}") from exc
        del self._what[:len(done)]
        return done

    def close(self) -> None:
        self.poll(blocking=True)
        self._queue.close()


class AsyncSaveError(RuntimeError):
    """A background checkpoint writer failed."""


def writer_helper_dies_with_parent() -> None:
    """Start megatron's checkpoint-writer helper (the multiprocessing Manager behind its results queue, a module
    global it would otherwise start itself, ~270 MiB) with an initializer that kills it when this process dies:
    after a SIGKILL of the trainer it used to stay alive, with its resource tracker."""
    import os

    import torch.multiprocessing as mp
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from multiprocessing.managers import SyncManager

    from megatron_gift.resilience.parent_death import die_with_parent

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()


def shutdown_writer_helpers() -> None:
    """Stop the helper process megatron's checkpoint writer keeps for its results queue (a multiprocessing
    Manager held in a module global). It is shut down at a normal interpreter exit, but not when the process
    is terminated (e.g. a daemonic test rank), and a leftover one keeps inherited stdout pipes open."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
    filesystem_async._results_queue = None


# ----------------------------------------------------------------------------- random generators
def capture_rng_state() -> Dict[str, Any]:
    """This rank's random generators (plain picklable values and CPU tensors)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch_cpu": torch.get_rng_state(),
             "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA state only where this host has CUDA and the state has it)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def build_stage_model_unloaded(arch, dtype: torch.dtype, vocab_multiple: int, device: torch.device, **overrides):
    """This rank's pipeline stage with initialised (not yet loaded) weights: the checkpoint replaces them.

    Resuming needs no initial weights for the policy, so it works at TP / PP > 1 without model.mcore_dir.
    """
    return build_gpt_model(arch, dtype=dtype, vocab_multiple=vocab_multiple, **overrides).to(device)
