"""Train-phase time and padding of padded vs token-budget vs packed microbatches, on the same rollouts.

Response lengths come from a long-tailed distribution (log-normal, clipped at the limit, mean about a third
of the limit: the shape of DAPO-Math rollouts); prompts vary a little. One set of groups, four ways to form
the rank's microbatches, each run with Megatron's unfused local attention and with the trainer's SDPA core
attention (mcore/sdpa_attention.py), timed interleaved (GiftSchedule.forward_backward, GIFT, anchor `old`
taken from the train pass):
  padded  -- `trainer.microbatches` equal microbatches of whole groups, each padded to its own longest
             sequence;
  budget  -- `trainer.max_tokens_per_microbatch`: groups binned by padded tokens (first-fit decreasing);
  packed  -- budget + `trainer.packing: rows` (sequences share rows, block-diagonal causal mask);
  thd     -- budget + `trainer.packing: thd` (one row, each sequence attended alone; SDPA only, since the
             unfused attention takes no THD).
Prints the padding fraction of each (share of token slots without a real token), the median times and
the ratios of the first (padded, unfused attention) to every other (> 1: faster). On CPU each runs with
torch's float32 GEMMs (MKL) and with the trainer's oneDNN GEMMs (mcore/onednn_linear.py) too.

  python benchmarks/packing.py                        # CPU, tiny model
  python benchmarks/packing.py --preset small --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_phase import PRESETS, _model, _setup, _timed  # noqa: E402

ATTENTIONS = {"both": ("unfused", "sdpa"), "unfused": ("unfused",), "sdpa": ("sdpa",)}
GEMMS = {"both": ("torch", "onednn"), "torch": ("torch",), "onednn": ("onednn",)}


def long_tailed_groups(n_groups: int, size: int, prompt: int, limit: int, vocab: int, seed: int = 0):
    """Groups whose response lengths are log-normal (sigma 1), clipped to [8, limit], mean about limit / 3."""
    from megatron_gift.algo.packing import RolloutGroup
    g = torch.Generator().manual_seed(seed)
    median = limit / 4.0  # log-normal(sigma=1): mean = median * e^0.5 ~ 1.65 median, minus the clipped tail: ~0.35
    groups = []
    for gid in range(n_groups):
        p = torch.randint(0, vocab, (prompt - int(torch.randint(0, prompt // 4 + 1, (1,), generator=g)),), generator=g)
        lens = (torch.randn(size, generator=g) + torch.log(torch.tensor(median))).exp().clamp(8, limit).long()
        responses = [torch.randint(0, vocab, (int(n),), generator=g) for n in lens]
        groups.append(RolloutGroup(gid, p, responses, torch.rand(size, generator=g)))
    return groups


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--limit", type=int, default=448, help="maximum response tokens")
    ap.add_argument("--microbatches", type=int, default=2, help="the padded layout's fixed count")
    ap.add_argument("--max-tokens", type=int, default=0, help="budget per microbatch (0: the padded layout's largest)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", choices=sorted(ATTENTIONS), default="both",
                    help="core attention of the local spec: Megatron's unfused one, torch SDPA (the trainer's), or both")
    ap.add_argument("--gemm", choices=sorted(GEMMS), default="both",
                    help="CPU float32 linear GEMMs: torch.matmul (MKL), oneDNN (the trainer's), or both; GPU: cuBLAS")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    p = dict(PRESETS[args.preset], prompt=args.prompt, response=args.limit)
    if not cuda:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    with _setup(cuda):
        from megatron.core.process_groups_config import ProcessGroupCollection

        from megatron_gift.algo import build_loss
        from megatron_gift.algo.packing import pack_microbatches
        from megatron_gift.algo.seq_packing import padding_fraction
        from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
        from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

        device = torch.device("cuda" if cuda else "cpu")
        groups = long_tailed_groups(args.groups, args.size, args.prompt, args.limit, p["vocab"])
        lengths = torch.tensor([float(r.numel()) for g in groups for r in g.responses])
        padded = pack_microbatches(groups, num_microbatches=args.microbatches)
        budget = args.max_tokens or max(mb.tokens.numel() for mb in padded)  # the padded layout's largest
        layouts = {"padded": padded, "budget": pack_microbatches(groups, max_tokens=budget),
                   "packed": pack_microbatches(groups, max_tokens=budget, packed="rows"),
                   "thd": pack_microbatches(groups, max_tokens=budget, packed="thd")}
        layouts = {k: [mb.to(device) for mb in v] for k, v in layouts.items()}
        pg = ProcessGroupCollection.use_mpu_process_groups()
        runs, shown = {}, {}
        gemms = ("torch",) if cuda else GEMMS[args.gemm]
        for attention, gemm in [(a, g) for a in ATTENTIONS[args.attention] for g in gemms]:
            torch.manual_seed(0)
            model = _model(p, cuda, attention, gemm)
            settings = OptimSettings(bf16=cuda)
            ddp = wrap_for_training([model], settings)
            build_optimizer(ddp, settings)
            schedule = GiftSchedule(ddp, build_loss("gift", {"anchor": "old"}), ScheduleSettings(vocab_size=p["vocab"]),
                                    pg)
            for k, mbs in layouts.items():
                if k == "thd" and attention == "unfused":
                    continue  # Megatron's unfused attention takes no THD: it would run one T x T block mask
                name = f"{k}/{attention}" + ("" if cuda else f"/{gemm}")
                runs[name] = lambda mbs=mbs, schedule=schedule: schedule.forward_backward(mbs, self_anchor=True)
                shown[name] = mbs
        for fn in runs.values():
            fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                times[k].append(_timed(fn, cuda))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"device: {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}; preset {args.preset}; "
              f"{args.groups} groups x {args.size}; prompt <= {args.prompt}, response limit {args.limit}: "
              f"mean {lengths.mean():.0f} ({lengths.mean() / args.limit:.2f} of the limit), median "
              f"{lengths.median():.0f}, max {lengths.max():.0f}; budget {budget} tokens; {args.repeats} interleaved repeats")
        for k, mbs in shown.items():
            shapes = " ".join(f"{mb.shape[0]}x{mb.shape[1]}" for mb in mbs)
            print(f"  {k:15s} padding {padding_fraction(mbs):5.1%}  median {med[k] * 1e3:9.1f} ms  "
                  f"{len(mbs)} microbatches [{shapes}]")
        base = next(iter(runs))
        for k in runs:
            if k != base:
                print(f"ratio ({base}) / ({k}): {med[base] / med[k]:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
