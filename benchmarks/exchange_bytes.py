"""Bytes each rank receives in one step's rollout exchange, before (all_gather_object of every engine
leader's scored groups to every rank, each rank's pickle padded to the largest) and after (each rank gets its replica's share as int32 tensors, rollout/wire.py).

Groups are synthetic with the recipe's shape: N responses per prompt, response lengths long-tailed with a
mean about a third of the limit (benchmarks/packing.py), prompts of --prompt tokens, sampled-token
log-probs attached (the engine returns them). A sample of groups is encoded both ways and scaled to the
step's prompt count.

  python benchmarks/exchange_bytes.py            # the 70B recipe: 1024 prompts x 16, limit 4096, 64 ranks, vLLM TP8, DP 2
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from benchmarks.packing import long_tailed_groups
    from megatron_gift.rollout.wire import encode_groups
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--limit", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--world", type=int, default=64)
    ap.add_argument("--engine-tp", type=int, default=8)
    ap.add_argument("--sample", type=int, default=64)
    args = ap.parse_args(argv)
    groups = long_tailed_groups(args.sample, args.responses, args.prompt, args.limit, vocab=128256)
    for g in groups:
        g.rollout_logprobs = [-torch.rand(r.numel()) for r in g.responses]
    scale = args.prompts / args.sample
    # all_gather_object pads every rank's pickle to the largest (an engine leader's share of the step) and
    # every rank receives world x that: the non-leaders' empty lists cost as much as a leader's groups.
    engines = args.world // args.engine_tp
    before = len(pickle.dumps(groups)) * scale / engines * args.world
    after = encode_groups(groups).numel() * 4 * scale / args.dp
    tokens = sum(g.num_tokens for g in groups) * scale
    print(f"{args.prompts} prompts x {args.responses}, {tokens / 1e6:.1f}M tokens per step, {args.world} ranks, {engines} engines, DP {args.dp}: "
          f"before {before / 2**20:.0f} MiB per rank, after {after / 2**20:.0f} MiB per rank "
          f"({before / after:.1f}x less)")


if __name__ == "__main__":
    main()
