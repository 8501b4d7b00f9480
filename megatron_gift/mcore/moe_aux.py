"""Megatron's MoE load-balancing (aux) loss under the GIFT schedule's loss scaling.

Owns: the per-step router coefficient that gives the aux gradient the weight docs/algorithm.md states,
the padding mask handed to the router, and the logged value read from Megatron's aux-loss tracker.

What megatron-core 0.16.1 does with calculate_per_token_loss (router.attach_and_log_load_balancing_loss): every
rank back-propagates coeff_cfg * n * L_r, where L_r is its share of the microbatch's Switch loss (its tokens'
router probabilities against the tokens-per-expert counted over TP x CP; the shares sum to the microbatch's loss
L_mb) and n the valid (non-padding) tokens. With a padding mask n is the whole microbatch's count over TP x CP
on every rank, not the rank's own (get_tokens_per_expert_and_token_count all-reduces the per-expert counts in
place, and the "local" count is read from the same tensor): measured, and pinned by the TP=2 x EP=2 test.
finalize_model_grads then divides every gradient by the step's global count N (sequences for GIFT, response
tokens for token-mean, mcore/schedule.py). Left alone that weights the aux loss by N's unit. What we want is

    coeff * sum_mb (n_mb / N_tok) * L_mb      (N_tok: valid tokens of the step over all data-parallel ranks),

the per-microbatch Switch losses averaged with token weights. Setting coeff_cfg = coeff * N / N_tok for the
pass gives exactly that (router weights are tagged sequence-parallel: their gradients are summed over TP). It
is fixed before the pass from host-side masks (one small all-reduce per step) and set on the shared
TransformerConfig, where the routers read it at every forward; `restore` puts the configured one back. Context parallelism and full recompute are
refused for now (config/moe.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_gift.algo.packing import Microbatch, padding_mask
from megatron_gift.utils.device import compute_device

TRACKER_NAME = "load_balancing_loss"  # the name megatron's router logs the Switch loss under
METRIC = "moe_load_balancing_loss"


def enabled(config) -> bool:
    """Whether the model's routers add Megatron's Switch load-balancing loss."""
    return getattr(config, "num_moe_experts", None) is not None and config.moe_router_load_balancing_type == "aux_loss"


@dataclass
class AuxPlan:
    """The configured coefficient (restored after the pass) and each microbatch's padding mask (keyed by id)."""

    base_coeff: float
    masks: Dict[int, torch.Tensor]


def plan(config, microbatches: Sequence[Microbatch], count: torch.Tensor, pg) -> AuxPlan:
    """Set the pass's router coefficient on `config` (undo with `restore`) and keep the microbatches' padding
    masks. count: this data-parallel rank's loss count (what finalize divides by)."""
    if not config.calculate_per_token_loss:
        raise ValueError("the MoE aux-loss weights assume calculate_per_token_loss=True when the routers were built")
    base = float(config.moe_aux_loss_coeff)
    pads = [padding_mask(mb) for mb in microbatches]
    totals = torch.stack([count.detach().double().reshape(()).cpu(),
                          sum((~p).sum().cpu() for p in pads).double()]).to(compute_device())
    dist.all_reduce(totals, group=pg.dp)
    n_count, n_tok = (float(x) for x in totals.cpu())
    config.moe_aux_loss_coeff = base * n_count / max(n_tok, 1.0)
    return AuxPlan(base, {id(mb): p for mb, p in zip(microbatches, pads)})


def forward_kwargs(aux: Optional[AuxPlan], config, mb: Microbatch, model_chunk, tp_group) -> dict:
    """The padding-mask kwarg of `mb`'s model call ({} when the loss is off).

    Megatron scatters the mask for sequence parallelism only on the first pipeline stage (GPTModel._preprocess);
    later stages are handed their slice here.
    """
    if aux is None:
        return {}
    from megatron.core.utils import get_attr_wrapped_model
    pad = aux.masks[id(mb)]
    if config.sequence_parallel and not get_attr_wrapped_model(model_chunk, "pre_process"):
        tp, r = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        s = pad.shape[1] // tp
        pad = pad[:, r * s:(r + 1) * s]
    return {"padding_mask": pad}


def _num_moe_layers(config) -> int:
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return len([i for i in range(config.num_layers) if i % freq == 0])
    return int(sum(freq))


def clear_tracker() -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    clear_aux_losses_tracker()


def finish(config, num_microbatches: int, pg) -> Dict[str, torch.Tensor]:
    """The logged Switch loss (mean over MoE layers and the step's microbatches, as a (sum, weight) pair summed
    over DP) from Megatron's tracker, which is then cleared."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    entry = get_moe_layer_wise_logging_tracker().get(TRACKER_NAME)
    device = compute_device()
    value = (entry["values"].sum().to(device) if entry else torch.zeros((), device=device)).float() / _num_moe_layers(config)
    for group in (pg.pp, pg.tp):  # layers live on their stages; the TP ranks hold shares of each microbatch's loss
        if dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
    pair = torch.stack([value, torch.tensor(float(num_microbatches), device=device)])
    dist.all_reduce(pair, group=pg.dp)
    clear_tracker()
    return {METRIC: pair}


def restore(aux: Optional[AuxPlan], config) -> None:
    """Put the configured coefficient back (after a failed pass too)."""
    if aux is not None:
        config.moe_aux_loss_coeff = aux.base_coeff
