#!/usr/bin/env python
"""Draw reward and loss curves of one or more runs (their metrics.jsonl) to a PNG.

  megatron-gift-plot runs/gift runs/grpo --out curves.png [--metrics reward_mean loss]
  megatron-gift-plot runs/gift --metrics reward_mean 'update*/grad_norm'   # a pattern: one line per match

A metric may be an fnmatch pattern (its panel has one line per matching key and run). With the default
metrics, runs that logged per-update diagnostics (trainer.updates_per_rollout > 1) get two more panels:
`update*/grad_norm` (the pre-clip norm, log scale) and `update*/loss`. Norms are drawn on a log scale.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import List, Optional, Sequence


from megatron_gift.trainer.report import read_metrics  # noqa: E402

DEFAULT_METRICS = ("reward_mean", "loss")
PER_UPDATE_PANELS = ("update*/grad_norm", "update*/loss")


def _keys(rows: Sequence[dict], metric: str) -> List[str]:
    """The keys a metric (a name or an fnmatch pattern) stands for in these rows, in a stable order."""
    if not any(c in metric for c in "*?["):
        return [metric]
    found = {k for r in rows for k in r if fnmatch.fnmatchcase(k, metric)}
    return sorted(found, key=lambda k: (len(k), k))


def default_metrics(rows_by_run: Sequence[Sequence[dict]]) -> List[str]:
    """reward_mean and loss, plus the per-update panels when any run logged update0/..."""
    per_update = any("update0/grad_norm" in r for rows in rows_by_run for r in rows)
    return list(DEFAULT_METRICS) + (list(PER_UPDATE_PANELS) if per_update else [])


def plot_runs(run_dirs: Sequence[str], out: str, metrics: Optional[Sequence[str]] = None,
              labels: Optional[Sequence[str]] = None) -> str:
    """One panel per metric (or pattern), one line per run and matching key; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_by_run = []
    for run in run_dirs:
        rows = read_metrics(run)
        if not rows:
            raise ValueError(f"{run}: metrics.jsonl has no rows")
        rows_by_run.append(rows)
    metrics = list(metrics) if metrics else default_metrics(rows_by_run)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for i, (run, rows) in enumerate(zip(run_dirs, rows_by_run)):
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        for ax, metric in zip(axes[0], metrics):
            for key in _keys(rows, metric):
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), marker=".", label=label if key == metric else f"{label} {key}")
    for ax, name in zip(axes[0], metrics):
        if "grad_norm" in name and ax.has_data():
            ax.set_yscale("log")
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
    ap.add_argument("--metrics", nargs="+", default=None,
                    help="names or fnmatch patterns (default: reward_mean loss, plus update*/grad_norm "
                         "update*/loss when the runs logged per-update diagnostics)")
    ap.add_argument("--labels", nargs="+")
    args = ap.parse_args(argv)
    print(plot_runs(args.runs, args.out, args.metrics, args.labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
