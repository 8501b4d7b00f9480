"""The trainer's throughput decisions: how a step's groups become microbatches, and when the anchor pass is elided.

Owns two small rules read from the run config:
- `microbatch_rule`: pack_microbatches' keywords: a fixed count (padded to one length under pipeline
  parallelism) or a token budget (`trainer.max_tokens_per_microbatch`), optionally packed (`trainer.packing`;
  THD pads each sequence to the multiple that TP / CP need).
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
        return dict(max_tokens=trainer.max_tokens_per_microbatch, packed=packed, pad_to_multiple=multiple)
    return dict(num_microbatches=trainer.microbatches, uniform_length=parallel.pp > 1, packed=packed,
                pad_to_multiple=multiple)


def self_anchored(loss, trainer) -> bool:
    """True when the anchor pass would recompute the train pass's own log-probs (anchor `old`, one update)."""
    return getattr(loss, "anchor", None) == "old" and trainer.updates_per_rollout == 1
