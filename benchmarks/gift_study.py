"""The second GIFT study: GIFT as released (several optimizer updates per rollout batch) against GRPO, with
error bars over seeds and a learning-rate sweep (issue 17). Uses the runner of benchmarks/gift_vs_grpo.py:
the same warm start, data and rollout settings for every run; only the loss, the update structure and the
learning rate differ.

Structures, compared at the same number of optimizer updates (each update sees 16 prompts x 8 responses):
  u1  one update per rollout batch of 16 prompts (the first study);
  u4  four updates per rollout batch of 64 prompts (the released recipe's structure, 1024 = 4 x 256 there).
Grid: {grpo, gift_old, gift_old_full, gift_ref} x {u1, u4} at the tuned lr, plus lr x0.3 and x3 for grpo and
gift_old at u4; each cell over --seeds. The RL prompt pool is 64 prompts for every run (a u4 batch is the pool).

  python benchmarks/gift_study.py --out runs/gift_study --seeds 1 2 3 4 5 --jobs 2

Finished runs are reused (an interrupted study continues). Writes OUT/study.json, OUT/study.md (tables,
per-update diagnostics, exact permutation tests) and OUT/study.png (mean +- std bands); prints the tables.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import gift_vs_grpo as runner  # noqa: E402

PROMPTS_PER_UPDATE = 16
POOL = 64  # RL prompts: one u4 rollout batch
STRUCTURES = {"u1": 1, "u4": 4}  # name -> updates per rollout batch
LOSSES = ("grpo", "gift_old", "gift_old_full", "gift_ref")
LR_SWEEP = {"losses": ("grpo", "gift_old"), "structure": "u4", "mults": (0.3, 3.0)}
SMOOTH_PROMPTS = 64  # the moving average of the train reward spans this many prompts
FINAL_PROMPTS = 128  # "final train reward": the mean over the last this many prompts


Cell = Tuple[str, str, float]  # (loss variant, structure, lr multiplier)


def grid() -> List[Cell]:
    cells = [(loss, s, 1.0) for s in STRUCTURES for loss in LOSSES]
    cells += [(loss, LR_SWEEP["structure"], m) for loss in LR_SWEEP["losses"] for m in LR_SWEEP["mults"]]
    return cells


def cell_name(cell: Cell) -> str:
    loss, structure, mult = cell
    return f"{structure}/{loss}" + ("" if mult == 1.0 else f"_lr{mult:g}x")


def cell_overrides(cell: Cell, base_lr: float, updates_total: int) -> List[str]:
    """The --set overrides of one cell (on top of the shared inputs and the loss variant's own)."""
    loss, structure, mult = cell
    u = STRUCTURES[structure]
    return [f"trainer.updates_per_rollout={u}", f"trainer.prompts_per_step={PROMPTS_PER_UPDATE * u}",
            f"data.max_prompts={POOL}", f"optim.lr={base_lr * mult:.6g}",
            f"trainer.eval_every={max(1, updates_total // 4 // u)}", f"trainer.steps={updates_total // u}"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "tiny_cpu.yaml"))
    ap.add_argument("--out", default="runs/gift_study")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--updates", type=int, default=64, help="optimizer updates per run (a multiple of 4)")
    ap.add_argument("--threshold", type=float, default=0.3,
                    help=f"train reward (moving average over {SMOOTH_PROMPTS} prompts) that counts as reached")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores // jobs threads)")
    ap.add_argument("--only", nargs="*", default=None, help="cell names to run (default: the whole grid)")
    args = ap.parse_args(argv)
    if args.updates % 4 or args.updates < 8:
        ap.error(f"--updates is {args.updates}; it must be a multiple of 4 and >= 8")
    return args


def summarize(run_dir: Path, updates_per_rollout: int, threshold: float) -> Dict[str, object]:
    """One run's numbers on the update axis: the reward of the rollout taken after k updates is at x = k."""
    from megatron_gift.trainer.report import read_metrics

    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("reward_mean") is not None]
    xs = [(r["step"] - 1) * updates_per_rollout for r in train]
    rewards = [r["reward_mean"] for r in train]
    per_step_prompts = PROMPTS_PER_UPDATE * updates_per_rollout
    smooth = runner.moving_average(rewards, max(1, SMOOTH_PROMPTS // per_step_prompts))
    reached = next((x for x, m in zip(xs, smooth) if m >= threshold), None)
    final = statistics.fmean(rewards[-max(1, FINAL_PROMPTS // per_step_prompts):])
    evals = [((r["step"]) * updates_per_rollout, r["eval/reward_mean"]) for r in rows
             if r.get("eval/reward_mean") is not None]
    return {"x": xs, "curve": smooth, "updates_to_threshold": reached, "final_train": final,
            "start_eval": evals[0][1] if evals else None, "final_eval": evals[-1][1] if evals else None,
            "eval_curve": evals,
            "grad_norm_by_update": per_update_values(train, updates_per_rollout, "grad_norm"),
            "loss_by_update": per_update_values(train, updates_per_rollout, "loss"),
            "rho_by_update": per_update_values(train, updates_per_rollout, "rho")}


def per_update_values(train: List[dict], u: int, key: str) -> List[Optional[float]]:
    """Median over rollout steps of `key` at each update index (the step's own value when u == 1)."""
    if u == 1:
        vals = [r[key] for r in train if r.get(key) is not None]
        return [statistics.median(vals) if vals else None]
    out = []
    for k in range(u):
        vals = [r[f"update{k}/{key}"] for r in train if r.get(f"update{k}/{key}") is not None]
        out.append(statistics.median(vals) if vals else None)
    return out


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def permutation_p(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Exact two-sided permutation test of the difference of means: the fraction of all relabellings of the
    pooled values whose |mean difference| is at least the observed one (None with fewer than 2 a side)."""
    if len(a) < 2 or len(b) < 2:
        return None
    pooled, n = list(a) + list(b), len(a)
    observed = abs(statistics.fmean(a) - statistics.fmean(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), n):
        chosen = set(idx)
        xa = [pooled[i] for i in idx]
        xb = [v for i, v in enumerate(pooled) if i not in chosen]
        total += 1
        hits += abs(statistics.fmean(xa) - statistics.fmean(xb)) >= observed - 1e-12
    return hits / total


def fmt(mean: Optional[float], std: Optional[float], spec: str = "{:.3f}") -> str:
    return "-" if mean is None else f"{spec.format(mean)} +- {spec.format(std)}"


def cell_table(results: Dict[str, List[dict]], updates: int, threshold: float) -> str:
    lines = [f"| cell | seeds reaching {threshold} | updates to it (reached seeds) | final train reward | "
             "held-out greedy start -> end | pre-clip grad norm by update index (median) |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        reached = [r["updates_to_threshold"] for r in runs if r["updates_to_threshold"] is not None]
        m, s, _ = mean_std(reached)
        fm, fs, _ = mean_std([r["final_train"] for r in runs])
        sm, _, _ = mean_std([r["start_eval"] for r in runs])
        em, es, _ = mean_std([r["final_eval"] for r in runs])
        norms = [statistics.median(v for v in col if v is not None) if any(v is not None for v in col) else None
                 for col in zip(*[r["grad_norm_by_update"] for r in runs])]
        norm_text = " / ".join("-" if n is None else f"{n:.3g}" for n in norms)
        lines.append(f"| {name} | {len(reached)}/{len(runs)} | {fmt(m, s, '{:.1f}')} | {fmt(fm, fs)} | "
                     f"{'-' if sm is None else f'{sm:.3f}'} -> {fmt(em, es)} | {norm_text} |")
    return "\n".join(lines)


def comparisons(results: Dict[str, List[dict]]) -> str:
    """exact permutation tests on the final train reward and the final held-out accuracy between chosen cells."""
    pairs = [("u1/gift_old", "u1/grpo"), ("u4/gift_old", "u4/grpo"), ("u4/gift_old_full", "u4/grpo"),
             ("u4/gift_ref", "u4/grpo"), ("u4/gift_old", "u1/gift_old"), ("u4/grpo", "u1/grpo"),
             ("u4/gift_old_full", "u4/gift_old"), ("u4/gift_old_lr0.3x", "u4/grpo_lr0.3x"),
             ("u4/gift_old_lr3x", "u4/grpo_lr3x")]
    lines = ["| A vs B | final train reward A - B | p (permutation) | final held-out A - B | p (permutation) |",
             "|---|---|---|---|---|"]
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        row = [f"{a} vs {b}"]
        for key in ("final_train", "final_eval"):
            va = [r[key] for r in results[a] if r[key] is not None]
            vb = [r[key] for r in results[b] if r[key] is not None]
            p = permutation_p(va, vb)
            row += [f"{statistics.fmean(va) - statistics.fmean(vb):+.3f}" if va and vb else "-",
                    "-" if p is None else f"{p:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def lr_sensitivity(results: Dict[str, List[dict]]) -> str:
    """Final train reward at lr x0.3 / x1 / x3 (u4), and the largest drop from x1."""
    lines = ["| loss (u4) | lr x0.3 | lr x1 | lr x3 | largest drop from x1 |", "|---|---|---|---|---|"]
    for loss in LR_SWEEP["losses"]:
        names = [f"u4/{loss}_lr0.3x", f"u4/{loss}", f"u4/{loss}_lr3x"]
        if not all(n in results for n in names):
            continue
        stats = [mean_std([r["final_train"] for r in results[n]]) for n in names]
        drop = max(stats[1][0] - stats[0][0], stats[1][0] - stats[2][0])
        lines.append(f"| {loss} | " + " | ".join(fmt(m, s) for m, s, _ in stats) + f" | {drop:+.3f} |")
    return "\n".join(lines)


def plot(results: Dict[str, List[dict]], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("u1, lr x1", lambda n: n.startswith("u1/")),
              ("u4, lr x1", lambda n: n.startswith("u4/") and "_lr" not in n),
              ("u4, lr sweep (grpo / gift_old)", lambda n: n.startswith("u4/") and n.split("/")[1].split("_lr")[0]
               in LR_SWEEP["losses"])]
    fig, grid_axes = plt.subplots(2, 2, figsize=(13, 8))
    axes = list(grid_axes.flat)
    for ax in axes[1:3]:
        ax.sharey(axes[0])
    for ax, (title, keep) in zip(axes, panels):
        for name, runs in results.items():
            if not keep(name):
                continue
            n = min(len(r["curve"]) for r in runs)
            xs = runs[0]["x"][:n]
            cols = [[r["curve"][i] for r in runs] for i in range(n)]
            mean = [statistics.fmean(c) for c in cols]
            std = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
            line, = ax.plot(xs, mean, label=f"{name.split('/')[1]} ({len(runs)} seeds)")
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("optimizer updates (16 prompts x 8 responses each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:3]:
        ax.set_ylabel(f"train reward (mean over {SMOOTH_PROMPTS} prompts), mean +- std over seeds", fontsize=8)
    norm_panel(axes[-1], results)
    fig.tight_layout()
    path = out / "study.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def norm_panel(ax, results: Dict[str, List[dict]]) -> None:
    """Median pre-clip gradient norm at each update index of a rollout batch (u4 cells at lr x1; log scale)."""
    for name, runs in results.items():
        if not name.startswith("u4/") or "_lr" in name:
            continue
        cols = list(zip(*[r["grad_norm_by_update"] for r in runs]))
        ax.plot(range(len(cols)), [statistics.median(c) for c in cols], marker="o", label=name.split("/")[1])
    ax.set_yscale("log")
    ax.set_xticks(range(STRUCTURES["u4"]))
    ax.set_title("u4: pre-clip grad norm by update index (median)")
    ax.set_xlabel("update index within a rollout batch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def run_cells(args, shared: List[str], base_lr: float) -> Dict[str, List[dict]]:
    cells = [c for c in grid() if args.only is None or cell_name(c) in args.only]
    jobs = [(c, seed) for c in cells for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    out = Path(args.out).resolve()

    def one(job):
        cell, seed = job
        loss = cell[0]
        overrides = shared + cell_overrides(cell, base_lr, args.updates)
        overrides += runner.variant_overrides(loss, args.config, overrides)
        steps = args.updates // STRUCTURES[cell[1]]
        return runner.run_one(args.config, out / cell_name(cell) / f"seed{seed}", steps, seed, overrides)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        walls = list(pool.map(one, jobs))
    ran = [w for w in walls if w > 0]
    print(f"[gift_study] {len(ran)} runs in {time.perf_counter() - start:.0f} s "
          f"(median {statistics.median(ran) if ran else 0:.0f} s a run, {args.jobs} at a time); "
          f"{len(walls) - len(ran)} reused", flush=True)
    return {cell_name(c): [summarize(out / cell_name(c) / f"seed{s}", STRUCTURES[c[1]], args.threshold)
                           for s in args.seeds] for c in cells}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from megatron_gift.config.run import load_run_config

    out = Path(args.out).resolve()
    base_lr = load_run_config(args.config, []).optim.lr
    shared = runner.prepare_shared_inputs(args.config, out, [])
    results = run_cells(args, shared, base_lr)
    command = "python benchmarks/gift_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n\n".join([f"`{command}` (base lr {base_lr:g}, {args.updates} updates a run)",
                        cell_table(results, args.updates, args.threshold), comparisons(results),
                        lr_sensitivity(results)])
    (out / "study.md").write_text(text + "\n")
    (out / "study.json").write_text(json.dumps({"args": vars(args), "base_lr": base_lr, "cells": results}, indent=1))
    print(text)
    print(f"[gift_study] plot: {plot(results, out)}; tables: {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
