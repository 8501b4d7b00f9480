"""GIFT / GRPO over Megatron-Core's pipeline schedules: the one place that knows forward_step / loss_func.

Loss-scaling contract (why `calculate_per_token_loss=True` is required on the model config):
- `loss_func` returns (loss_sum, count, metrics): loss_sum is the SUM of the loss terms of the
  microbatch, count how many units it covers: sequences for GIFT and the seq-mean aggregations, response
  tokens for token-mean (GRPO / DAPO, algo/policy_terms.py). An int tensor, reported by context-parallel
  rank 0 only, since every CP rank holds the same, CP-reduced loss and count.
- With calculate_per_token_loss, Megatron's schedule neither divides by the number of microbatches
  nor averages gradients over data-parallel ranks (DDP gradient_scaling_factor = 1); instead
  finalize_model_grads all-reduces the summed counts over the DP x CP group and scales gradients by
  1 / count. The gradient is therefore d(sum of all terms) / N_total: one division by the global number
  of sequences (or tokens), whatever the microbatch count, DP or CP size.
- Metrics are (sum, weight) pairs, summed over microbatches and the DP group after the step, then
  broadcast from the last pipeline stage; the division happens once at step end (the only host sync).

Two schedules: `single_pass` keeps every group inside one microbatch; `two_pass` (GIFT only) first
runs a forward-only pass for all sequence log-ratios h, computes the analytic per-sequence coefficients
c_j = dL/dh_j per group, then back-propagates the surrogate sum_j N_total * c_j * h_j, which may
split groups across microbatches. Both give the same gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank, get_model_config

from megatron_gift.algo.loss import has_coefficients, loss_count
from megatron_gift.algo.packing import Microbatch
from megatron_gift.algo.seq_packing import to_sequences
from megatron_gift.algo.routes import ROUTES_KEY
from megatron_gift.mcore import moe_aux, routing_replay
from megatron_gift.mcore.logprobs import context_parallel_reducer, vocab_parallel_logprobs
from megatron_gift.mcore.packed import forward_packed
from megatron_gift.algo.types import LossInputs, Tensor, is_max_metric, reduce_metrics
from megatron_gift.utils.device import compute_device



@dataclass
class ScheduleSettings:
    """vocab_size: the true (unpadded) vocabulary; temperature: the rollout's sampling temperature."""

    vocab_size: int
    temperature: float = 1.0
    mode: str = "single_pass"

    def __post_init__(self):
        if self.mode not in ("single_pass", "two_pass"):
            raise ValueError(f"schedule mode must be 'single_pass' or 'two_pass', got {self.mode!r}")


@dataclass
class StepResult:
    metrics: Dict[str, Tensor] = field(default_factory=dict)  # name -> (sum, weight), globally reduced
    grad_norm: Optional[float] = None
    update_successful: bool = True

    def values(self) -> Dict[str, float]:
        """Reported metric values sum / weight (host sync: call at step end only)."""
        return {k: float(v[0] / v[1]) if float(v[1]) > 0 else float("nan") for k, v in self.metrics.items()}


def _local_view(mb: Microbatch, cp_group) -> Dict[str, Tensor]:
    """This CP rank's slice (2*cp load-balanced chunks along the sequence) of the microbatch tensors."""
    li = mb.loss_inputs
    batch = {"tokens": mb.tokens, "position_ids": mb.position_ids, "targets": mb.targets, "mask": li.mask,
             "anchor": li.anchor_logprobs, "rollout": mb.rollout_logprobs, "ref": li.ref_logprobs,
             "routes": mb.extras.get(ROUTES_KEY)}  # routing replay: [b, S, layers, k] host routes (algo/routes.py)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        if mb.packed is not None:
            raise ValueError("trainer.packing with parallel.cp > 1 is not supported; set trainer.packing: none")
        batch = get_batch_on_this_cp_rank(dict(batch), cp_group=cp_group)
    batch["packed"] = mb.packed
    return batch


class GiftSchedule:
    """Runs anchor (forward-only) and training (forward-backward) passes of a loss over Megatron's schedule.

    model: list of model chunks (one per virtual pipeline stage), DDP-wrapped for training;
    loss: a loss from megatron_gift.algo (GIFTLoss / GRPOLoss); pg: a ProcessGroupCollection with
    tp, pp, cp, dp (without CP) and dp_cp groups.
    """

    def __init__(self, model: List[torch.nn.Module], loss, settings: ScheduleSettings, pg):
        self.model, self.loss, self.settings, self.pg = model, loss, settings, pg
        self.config = get_model_config(model[0])
        if not self.config.calculate_per_token_loss:
            raise ValueError("the GIFT schedule needs calculate_per_token_loss=True in the model's TransformerConfig "
                             "(one division by the global number of sequences, see mcore/schedule.py)")
        if settings.mode == "two_pass" and not has_coefficients(loss):
            raise ValueError(f"the two-pass schedule needs analytic coefficients; loss '{loss.name}' has none")
        self._cp_rank = dist.get_rank(pg.cp) if dist.get_world_size(pg.cp) > 1 else 0
        self.self_anchor = False  # anchor = the train pass's own detached log-probs (set per step, see train_step)
        self._aux: Optional[moe_aux.AuxPlan] = None  # MoE load-balancing loss weights of the running train pass

    # ----- the forward_step / loss_func contract -------------------------------------------------
    def _forward_step(self, loss_fn, data_iterator, model):
        mb: Microbatch = next(data_iterator)
        view = _local_view(mb, self.pg.cp)
        routes = routing_replay.microbatch_routes(view.pop("routes"), self.config, self.pg.tp, mb.tokens.device)
        aux = moe_aux.forward_kwargs(self._aux, self.config, mb, model, self.pg.tp)
        with routing_replay.replaying_tokens(model, routes):
            if mb.packed is not None:
                output = forward_packed(model, view["tokens"], view["position_ids"], mb.packed, **aux)
            else:
                output = model(view["tokens"], view["position_ids"], None, **aux)
        return output, partial(loss_fn, mb, view)

    def _logprobs(self, logits: Tensor, view) -> Tensor:
        """Token log-probs in the per-sequence layout [B, T] (packed rows are mapped back)."""
        logp = vocab_parallel_logprobs(logits, view["targets"], vocab_size=self.settings.vocab_size,
                                       temperature=self.settings.temperature, tp_group=self.pg.tp)
        return logp if view["packed"] is None else to_sequences(logp, view["packed"])

    def _local_inputs(self, mb: Microbatch, view) -> LossInputs:
        li = mb.loss_inputs
        return LossInputs(mask=view["mask"], anchor_logprobs=view["anchor"], rewards=li.rewards,
                          group_index=li.group_index, num_groups=li.num_groups, group_ids=li.group_ids,
                          ref_logprobs=view.get("ref"))

    def _count(self, n: Tensor) -> Tensor:
        """Sequences this rank reports to finalize_model_grads (CP rank 0 only: the loss is CP-replicated)."""
        n = n.detach().to(torch.int)
        return n if self._cp_rank == 0 else torch.zeros_like(n)

    def _train_loss(self, mb: Microbatch, view, logits: Tensor):
        logp = self._logprobs(logits, view)
        if self.self_anchor:  # the anchor pass would recompute exactly these values: take them, detached
            view["anchor"] = logp.detach() * view["mask"]
        inputs = self._local_inputs(mb, view)
        out = self.loss(logp, inputs, context_parallel_reducer(self.pg.cp))
        metrics = dict(out.metrics)
        if view["rollout"] is not None:
            metrics.update(_mismatch_metrics(logp.detach(), view["rollout"], view["mask"], self.pg.cp))
        return out.loss_sum, self._count(out.num_sequences), metrics

    def _logprob_loss(self, mb: Microbatch, view, logits: Tensor):
        """Forward-only pass: keep the local token log-probs, contribute nothing to any loss."""
        logp = self._logprobs(logits, view).detach()
        zero = logits.sum() * 0.0
        return zero, torch.zeros((), dtype=torch.int), {"logprobs": logp}

    # ----- passes --------------------------------------------------------------------------------
    def _run(self, loss_fn, model, microbatches: Sequence[Microbatch], forward_only: bool):
        fb = get_forward_backward_func()
        n_chunks = len(model)
        iters = [iter(microbatches) for _ in range(n_chunks)]
        b, s = microbatches[0].shape
        s_local = s // max(1, dist.get_world_size(self.pg.cp))
        if dist.get_world_size(self.pg.pp) > 1 and len({mb.shape for mb in microbatches}) > 1:
            self.config.variable_seq_lengths = True  # token-budget / packed microbatches: stages exchange shapes
        try:
            return fb(forward_step_func=partial(self._forward_step, loss_fn),
                      data_iterator=iters if n_chunks > 1 else iters[0], model=model if n_chunks > 1 else model[0],
                      num_microbatches=len(microbatches), seq_length=s_local, micro_batch_size=b,
                      forward_only=forward_only)
        finally:
            routing_replay.end_pass(model)  # routing replay: normal routing again, no routes held

    def compute_logprobs(self, model: List[torch.nn.Module], microbatches: Sequence[Microbatch]) -> List[Tensor]:
        """Forward-only token log-probs [b, S] per microbatch (full sequence, on every rank of the PP/CP groups)."""
        for chunk in model:
            chunk.eval()
        with torch.no_grad():
            stored = self._run(self._logprob_loss, model, microbatches, forward_only=True)
        for chunk in model:
            chunk.train()
        local = [d["logprobs"] for d in stored] if stored else None
        return [self._gather_full(local[i] if local else None, mb) for i, mb in enumerate(microbatches)]

    def fill_anchor_logprobs(self, anchor_model: List[torch.nn.Module], microbatches: Sequence[Microbatch]) -> None:
        """Anchor pass: reference model (anchor `ref`) or the pre-update policy (anchor `old`)."""
        for mb, logp in zip(microbatches, self.compute_logprobs(anchor_model, microbatches)):
            mb.loss_inputs.anchor_logprobs = logp * mb.loss_inputs.mask

    def _gather_full(self, local: Optional[Tensor], mb: Microbatch) -> Tensor:
        """Rebuild [b, S] from CP slices and broadcast it from the last pipeline stage."""
        b, s = mb.sequence_shape
        cp = self.pg.cp
        if local is not None and dist.get_world_size(cp) > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(cp))]
            dist.all_gather(parts, local.contiguous(), group=cp)
            local = _undo_cp_split(parts, s)
        full = local if local is not None else torch.empty(b, s, dtype=torch.float32, device=mb.tokens.device)
        if dist.get_world_size(self.pg.pp) > 1:
            dist.broadcast(full, src=dist.get_process_group_ranks(self.pg.pp)[-1], group=self.pg.pp)
        return full

    def forward_backward(self, microbatches: Sequence[Microbatch], self_anchor: bool = False) -> Dict[str, Tensor]:
        """Zeroed grad buffers, then forward-backward over all microbatches; finalised grads in main_grad.

        Returns the step's metrics, globally reduced. self_anchor: see train_step.
        """
        for chunk in self.model:
            chunk.zero_grad_buffer()
        if self_anchor and (self.config.hidden_dropout or self.config.attention_dropout):
            self.fill_anchor_logprobs(self.model, microbatches)  # with dropout the train pass is not the anchor
            self_anchor = False
        self.self_anchor = self_anchor
        try:
            if self.settings.mode == "two_pass":
                stored = self._two_pass(microbatches)
            else:
                self._plan_aux(microbatches)
                stored = self._run(self._train_loss, self.model, microbatches, forward_only=False)
            metrics = self._reduce_metrics(stored)
            if self._aux is not None:
                metrics.update(moe_aux.finish(self.config, len(microbatches), self.pg))
        finally:
            self.self_anchor = False
            moe_aux.restore(self._aux, self.config)
            self._aux = None
        return metrics

    def _plan_aux(self, microbatches: Sequence[Microbatch], count: Optional[Tensor] = None) -> None:
        """Router coefficients of the coming train pass when the MoE load-balancing loss is on (mcore/moe_aux.py)."""
        if not moe_aux.enabled(self.config):
            return
        if count is None:
            count = sum(loss_count(self.loss, mb.loss_inputs) for mb in microbatches)
        moe_aux.clear_tracker()
        self._aux = moe_aux.plan(self.config, microbatches, count, self.pg)

    def train_step(self, microbatches: Sequence[Microbatch], optimizer, self_anchor: bool = False) -> StepResult:
        """forward_backward then the optimizer step (gradient clipping inside the Megatron optimizer).

        self_anchor: the anchor log-probs are the policy's own before this update (anchor `old`, one update per
        rollout): they are taken, detached, from the train pass itself instead of a separate forward pass (a
        model with dropout still gets the separate eval-mode pass: its train pass differs from it).
        """
        optimizer.zero_grad()
        metrics = self.forward_backward(microbatches, self_anchor=self_anchor)
        update_successful, grad_norm, _ = optimizer.step()
        return StepResult(metrics=metrics, grad_norm=grad_norm, update_successful=bool(update_successful))

    def _reduce_metrics(self, stored: List[dict]) -> Dict[str, Tensor]:
        """Sum pairs over DP (max for *_max metrics), then broadcast from the last pipeline stage."""
        pairs = reduce_metrics([{k: v for k, v in d.items() if v.shape == (2,)} for d in stored]) if stored else {}
        names = sorted(pairs)
        device = compute_device()
        last = dist.get_process_group_ranks(self.pg.pp)[-1] if dist.get_world_size(self.pg.pp) > 1 else None
        if last is not None:
            box = [names]
            dist.broadcast_object_list(box, src=last, group=self.pg.pp)
            names = box[0]
        flat = torch.stack([pairs[k] for k in names]).to(device) if pairs else torch.zeros(len(names), 2, device=device)
        is_max = torch.tensor([is_max_metric(k) for k in names], device=device, dtype=torch.bool)[:, None]
        summed, maxed = torch.where(is_max, 0.0, flat), torch.where(is_max, flat, float("-inf"))
        dist.all_reduce(summed, group=self.pg.dp)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=self.pg.dp)
        flat = torch.where(is_max, maxed, summed)
        if last is not None:
            dist.broadcast(flat, src=last, group=self.pg.pp)
        return {k: flat[i] for i, k in enumerate(names)}

    # ----- two-pass analytic schedule (GIFT) -----------------------------------------------------
    def _two_pass(self, microbatches: Sequence[Microbatch]):
        logps = self.compute_logprobs(self.model, microbatches)
        if self.self_anchor:  # the forward-only pass is the anchor pass
            for lp, mb in zip(logps, microbatches):
                mb.loss_inputs.anchor_logprobs = lp * mb.loss_inputs.mask
        h = torch.cat([((lp - mb.loss_inputs.anchor_logprobs) * mb.loss_inputs.mask).sum(-1).double()
                       for lp, mb in zip(logps, microbatches)])
        rank_inputs = _rank_inputs(microbatches)
        counted = self.loss.from_log_ratios(h, rank_inputs).num_sequences.detach().double()
        n_total = counted.clone()
        dist.all_reduce(n_total, group=self.pg.dp)
        coeff = self.loss.coefficients(h, rank_inputs, n_total) * n_total  # finalize divides by n_total again
        self._plan_aux(microbatches, counted)
        offsets = torch.cumsum(torch.tensor([0] + [mb.sequence_shape[0] for mb in microbatches]), 0)
        position = {id(mb): i for i, mb in enumerate(microbatches)}
        last = len(microbatches) - 1

        def surrogate(mb, view, logits):
            index = position[id(mb)]
            logp = self._logprobs(logits, view)
            c = coeff[offsets[index]:offsets[index + 1]].to(logp.dtype)
            h_mb = context_parallel_reducer(self.pg.cp)(((logp - view["anchor"]) * view["mask"]).sum(-1))
            count = counted if index == last else torch.zeros_like(counted)  # the rank's count, reported once
            return (c * h_mb).sum(), self._count(count), {}

        return self._run(surrogate, self.model, microbatches, forward_only=False)


def _rank_inputs(microbatches: Sequence[Microbatch]) -> LossInputs:
    """All sequences of this rank as one LossInputs, groups re-indexed by global group id (may span microbatches)."""
    gids = torch.cat([mb.loss_inputs.group_ids for mb in microbatches])
    uniq, index = torch.unique(gids, return_inverse=True)
    if len(torch.unique_consecutive(gids)) != len(uniq):
        raise ValueError("two-pass schedule: sequences of a group must be contiguous across microbatches")
    rewards = torch.cat([mb.loss_inputs.rewards for mb in microbatches]).double()
    mask = torch.ones(len(gids), 1, device=gids.device)
    return LossInputs(mask=mask, anchor_logprobs=torch.zeros_like(mask), rewards=rewards, group_index=index,
                      num_groups=len(uniq), group_ids=gids)


def _undo_cp_split(parts: List[Tensor], s: int) -> Tensor:
    """Inverse of get_batch_on_this_cp_rank: rank r holds chunks r and 2*cp-1-r of 2*cp along dim 1."""
    cp = len(parts)
    chunk = s // (2 * cp)
    out = torch.empty(parts[0].shape[0], s, dtype=parts[0].dtype, device=parts[0].device)
    for r, part in enumerate(parts):
        out[:, r * chunk:(r + 1) * chunk] = part[:, :chunk]
        j = 2 * cp - 1 - r
        out[:, j * chunk:(j + 1) * chunk] = part[:, chunk:]
    return out


def _mismatch_metrics(logp: Tensor, rollout: Tensor, mask: Tensor, cp_group) -> Dict[str, Tensor]:
    """Train / rollout log-prob mismatch |logp_train - logp_rollout| over response tokens: mean and max."""
    diff = (logp - rollout).abs() * mask
    total, n, worst = diff.sum(), mask.sum(), diff.max()
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        pair = torch.stack([total, n])
        dist.all_reduce(pair, group=cp_group)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=cp_group)
        total, n = pair[0], pair[1]
    return {"logprob_mismatch_mean": torch.stack([total, n]).float(),
            "logprob_mismatch_max": torch.stack([worst, torch.ones_like(worst)]).float()}
