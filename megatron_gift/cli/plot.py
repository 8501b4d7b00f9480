#!/usr/bin/env python
"""Draw reward and loss curves of one or more runs (their metrics.jsonl) to a PNG.

  megatron-gift-plot runs/gift runs/grpo --out curves.png [--metrics reward_mean loss]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence


from megatron_gift.trainer.report import read_metrics  # noqa: E402

DEFAULT_METRICS = ("reward_mean", "loss")


def plot_runs(run_dirs: Sequence[str], out: str, metrics: Sequence[str] = DEFAULT_METRICS,
              labels: Optional[Sequence[str]] = None) -> str:
    """One panel per metric, one line per run; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        if not rows:
            raise ValueError(f"{run}: metrics.jsonl has no rows")
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        for ax, name in zip(axes[0], metrics):
            points = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=label)
    for ax, name in zip(axes[0], metrics):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    ap.add_argument("--out", default="curves.png")
    ap.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    ap.add_argument("--labels", nargs="+")
    args = ap.parse_args(argv)
    print(plot_runs(args.runs, args.out, args.metrics, args.labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
