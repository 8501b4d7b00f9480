"""Routed experts of rollout samples laid out for routing replay (R3); pure torch, host side.

Owns the conversion from the rollout engine's per-sample routes to the token order Megatron's routers see:
- per sample (vLLM `CompletionOutput.routed_experts`, vllm 0.32): [P + L - 1, num_layers, top_k], one row per
  token the engine fed through the model: the P prompt tokens and every response token but the last (the last
  sampled token is never fed back). Layer axis: every decoder layer, dense ones included (their rows are
  meaningless); the MoE layers are picked by index on the Megatron side.
- per microbatch sequence (`sequence_routes`): [B, T, num_layers, top_k] aligned with the microbatch's
  per-sequence layout (row i = sequence i of `collate`, column t = token t); tokens without a route (the last
  response token, padding) get experts 0..k-1: causal attention keeps them from every masked-in log-prob.
- model rows (`model_rows`, what `attach_routes` stores in the microbatch): the same for padded microbatches,
  the packed rows [R, S, layers, k] for packed ones (seq_packing.py); host tensors.
- Megatron token order (`token_order`): [s * b, num_layers, top_k], the flattening of the [s, b] hidden states
  (token t of row r at t * b + r), i.e. one [tokens, top_k] tensor per layer after `[:, layer]`.
Does not own: where routes come from (rollout/vllm_engine.py) or how the routers replay them (mcore/routing_replay.py).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from megatron_gift.algo.packing import Microbatch, RolloutGroup
from megatron_gift.algo.types import Tensor

ROUTES_KEY = "routes"  # Microbatch.extras key of the per-sequence routes [B, T, layers, k]


def default_routes(shape: Sequence[int], dtype: torch.dtype = torch.int64) -> Tensor:
    """[*shape, layers, k] filled with experts 0..k-1 (tokens that have no route and affect no loss term)."""
    *lead, layers, k = shape
    return torch.arange(k, dtype=dtype).expand(*lead, layers, k).clone()


def check_group_routes(g: RolloutGroup) -> None:
    """Every response has routes of P + L - 1 rows and the same [layers, k] (ValueError naming the group)."""
    if g.routed_experts is None:
        raise ValueError(f"rollout.routing_replay: group {g.group_id} has no routed experts")
    if len(g.routed_experts) != g.size:
        raise ValueError(f"group {g.group_id}: {len(g.routed_experts)} route tensors for {g.size} responses")
    tail = tuple(g.routed_experts[0].shape[1:])
    for j, (resp, r) in enumerate(zip(g.responses, g.routed_experts)):
        rows = g.prompt.numel() + resp.numel() - 1
        if r.dim() != 3 or r.shape[0] != rows or tuple(r.shape[1:]) != tail:
            raise ValueError(f"group {g.group_id} response {j}: routed experts of shape {tuple(r.shape)}, expected "
                             f"[{rows} (prompt + response - 1), layers, top_k]")


def sequence_routes(mb: Microbatch, groups: Sequence[RolloutGroup]) -> Tensor:
    """Routes of the microbatch's sequences [B, T, layers, k] (row order of `collate`: the microbatch's groups by
    loss_inputs.group_ids, each group's responses in order)."""
    by_id: Dict[int, RolloutGroup] = {g.group_id: g for g in groups}
    gids = mb.loss_inputs.group_ids.tolist()
    first = by_id[gids[0]].routed_experts[0]
    b, t = mb.sequence_shape
    out = default_routes((b, t, *first.shape[1:]), dtype=first.dtype)
    seen: Dict[int, int] = {}
    for i, gid in enumerate(gids):
        j = seen.get(gid, 0)
        seen[gid] = j + 1
        r = by_id[gid].routed_experts[j]
        out[i, :r.shape[0]] = r
    return out


def model_rows(mb: Microbatch, routes: Tensor) -> Tensor:
    """Per-sequence routes [B, T, layers, k] -> the rows the model sees: the same for padded microbatches, the
    packed rows [R, S, layers, k] for packed ones (host tensors: the layout is still on the host when packing)."""
    if mb.packed is None:
        return routes
    packed = mb.packed
    n_rows, s = packed.segment_ids.shape
    flat = default_routes((n_rows * s, *routes.shape[2:]), dtype=routes.dtype)
    real = torch.arange(routes.shape[1])[None, :] < packed.lengths[:, None]  # past its end a sequence repeats its last
    flat[packed.seq_index[real]] = routes[real]
    return flat.view(n_rows, s, *routes.shape[2:])


def attach_routes(mbs: Sequence[Microbatch], groups: Sequence[RolloutGroup]) -> None:
    """Store each microbatch's routes, laid out as the model's rows, in mb.extras[ROUTES_KEY] (host tensors; the
    groups' routes are checked first)."""
    for g in groups:
        check_group_routes(g)
    for mb in mbs:
        mb.extras[ROUTES_KEY] = model_rows(mb, sequence_routes(mb, groups))


def token_order(routes: Tensor) -> Tensor:
    """Routes of the model's rows [b, s, layers, k] (this rank's context-parallel slice) -> [s * b, layers, k] in
    Megatron's token order: the [s, b, h] hidden states the routers see, flattened s-major."""
    b, s = routes.shape[:2]
    return routes.transpose(0, 1).reshape(s * b, *routes.shape[2:])


def sequence_parallel_share(routes: Tensor, tp_size: int, tp_rank: int) -> Tensor:
    """This tensor-parallel rank's tokens under sequence parallelism: the [s, b] hidden states are split along s
    into tp contiguous parts, i.e. contiguous parts of the s-major token order."""
    if routes.shape[0] % tp_size:
        raise ValueError(f"routing replay: {routes.shape[0]} tokens do not split over {tp_size} sequence-parallel ranks")
    return routes.chunk(tp_size)[tp_rank]


def per_sample_routes(routes_tokens: List[Tensor], layer_index: List[int], num_layers: int, b: int,
                      lengths: Sequence[int]) -> List[Tensor]:
    """Inverse of the trainer-side layout, for routes recorded from Megatron's routers (tests, an engine stand-in):
    one [s * b, k] tensor per MoE layer (global layer indices `layer_index`) of an unpacked microbatch -> per sample
    [n_i - 1, num_layers, k] (vLLM's layout; layers without a router hold experts 0..k-1)."""
    k = routes_tokens[0].shape[1]
    s = routes_tokens[0].shape[0] // b
    full = default_routes((b, s, num_layers, k), dtype=routes_tokens[0].dtype)
    for layer, r in zip(layer_index, routes_tokens):
        full[:, :, layer] = r.view(s, b, k).transpose(0, 1)
    return [full[i, :n - 1].clone() for i, n in enumerate(lengths)]
