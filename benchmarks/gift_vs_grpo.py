"""GIFT against GRPO on the embedded arithmetic task: learning curves, steps to a reward threshold,
final train reward and held-out accuracy (the train / held-out gap is the paper's overfitting claim).

Every variant starts from the same warm-started tiny Llama, the same data, the same seeds and the same
rollout settings (examples/tiny_cpu.yaml unless --config says otherwise); only the loss differs. Runs are
separate `python -m megatron_gift.train` processes, one after another, each in OUT/<variant>/seed<k>;
a finished run (its metrics.jsonl has the last step) is reused, so an interrupted study continues.

  python benchmarks/gift_vs_grpo.py --out runs/gift_vs_grpo --seeds 1 2 3 --steps 60
  python benchmarks/gift_vs_grpo.py --variants grpo gift_old gift_ref --seeds 1      # a subset
  python benchmarks/gift_vs_grpo.py --variants grpo dapo gspo gift_old --seeds 1 2   # the paper's baselines

Writes OUT/summary.json, OUT/summary.md and OUT/curves.png; prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> --set overrides on top of the config (the config's own loss section is replaced).
VARIANTS: Dict[str, List[str]] = {
    "grpo": ["loss.name=grpo", "loss.options={}"],  # verl's defaults: token-mean, dual clip 3
    "grpo_seq_mean": ["loss.name=grpo", "loss.options={loss_agg_mode: seq-mean-token-mean}"],  # the first study's GRPO
    # DAPO's recipe: clip-higher + token-mean (the `dapo` loss), dynamic sampling; overlong shaping is added
    # from the config by variant_overrides (its length limit is the config's max_new_tokens).
    "dapo": ["loss.name=dapo", "loss.options={}", "trainer.dynamic_sampling.enabled=true"],
    "gspo": ["loss.name=gspo", "loss.options={}"],  # the paper's sequence clip range (3e-4, 4e-4)
    "gift_old": ["loss.name=gift", "loss.options={beta: 1.0, grad_mode: detached, anchor: old}"],
    "gift_old_full": ["loss.name=gift", "loss.options={beta: 1.0, grad_mode: full, anchor: old}"],
    "gift_ref": ["loss.name=gift", "loss.options={beta: 1.0, grad_mode: detached, anchor: ref}"],
    "gift_ref_full": ["loss.name=gift", "loss.options={beta: 1.0, grad_mode: full, anchor: ref}"],
    "gift_ref_b0.5": ["loss.name=gift", "loss.options={beta: 0.5, grad_mode: detached, anchor: ref}"],
    "gift_ref_b2": ["loss.name=gift", "loss.options={beta: 2.0, grad_mode: detached, anchor: ref}"],
}
# With anchor `old` and one update per rollout every log-ratio is 0 when the loss is taken, so beta only
# scales the (clipped) gradient: the beta sweep is run with anchor `ref`, where it changes the fixed point.
SMOOTH = 5  # steps in the moving average of the train reward


def variant_overrides(name: str, config: str, overrides: Sequence[str] = ()) -> List[str]:
    """VARIANTS[name], plus for `dapo` the config's reward terms and DAPO's overlong term (buffer: the last
    quarter of rollout.sampling.max_new_tokens; DAPO used 4096 of 20480)."""
    extra = list(VARIANTS[name])
    if name == "dapo":
        from megatron_gift.config.schema import apply_overrides, load_yaml
        data = apply_overrides(load_yaml(config), list(overrides))
        limit = int(data.get("rollout", {}).get("sampling", {}).get("max_new_tokens", 0))
        if limit < 4:
            raise ValueError(f"variant dapo: {config} needs rollout.sampling.max_new_tokens >= 4 for overlong shaping")
        terms = list(data.get("rewards", {}).get("terms", [{"name": "math_verify"}]))
        terms.append({"name": "overlong", "kwargs": {"max_response_tokens": limit, "buffer_tokens": max(1, limit // 4)}})
        extra.append("rewards.terms=" + json.dumps(terms))
    return extra


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "tiny_cpu.yaml"))
    ap.add_argument("--out", default="runs/gift_vs_grpo")
    ap.add_argument("--variants", nargs="+", default=["grpo", "gift_old", "gift_ref"], choices=sorted(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threshold", type=float, default=0.35,
                    help=f"train reward ({SMOOTH}-step moving average) that counts as reached")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (e.g. trainer.updates_per_rollout=2)")
    return ap.parse_args(argv)


def prepare_shared_inputs(config: str, out: Path, overrides: List[str]) -> List[str]:
    """The warm start and the task, made once in OUT/shared; overrides that point every run at them."""
    from megatron_gift.config.run import load_run_config
    from megatron_gift.demo.warmstart import prepare_demo_inputs

    cfg = load_run_config(config, overrides)
    if not cfg.model.hf_dir:
        prepare_demo_inputs(cfg, str(out / "shared"), log=print)
    sets = [f"model.hf_dir={cfg.model.hf_dir}", f"data.path={cfg.data.path}"]
    if cfg.eval_data is not None:
        sets.append(f"eval_data.path={cfg.eval_data.path}")
    return sets


def run_one(config: str, run_dir: Path, steps: int, seed: int, overrides: List[str]) -> float:
    """Train one variant/seed unless already finished; returns the wall time in seconds (0 if reused)."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and any(json.loads(ln).get("step") == steps and "reward_mean" in json.loads(ln)
                                for ln in metrics.read_text().splitlines() if ln.strip()):
        print(f"[gift_vs_grpo] reusing {run_dir}")
        return 0.0
    if metrics.exists():
        metrics.unlink()  # an unfinished run restarts from scratch (its rows would be stale)
    cmd = [sys.executable, "-m", "megatron_gift.train", config, "--set", f"trainer.run_dir={run_dir}",
           "--set", f"trainer.steps={steps}", "--set", f"trainer.seed={seed}"]
    for o in overrides:
        cmd += ["--set", o]
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[gift_vs_grpo] {run_dir}: {' '.join(cmd[3:])}", flush=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_dir}: training exited with {proc.returncode}; see {run_dir / 'train.log'}")
    return time.perf_counter() - start


def moving_average(values: List[float], k: int) -> List[float]:
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def summarize_run(run_dir: Path, threshold: float) -> Dict[str, object]:
    from megatron_gift.trainer.report import read_metrics

    rows = read_metrics(run_dir)
    train = [(r["step"], r["reward_mean"]) for r in rows if r.get("reward_mean") is not None]
    evals = [(r["step"], r["eval/reward_mean"]) for r in rows if r.get("eval/reward_mean") is not None]
    smooth = moving_average([v for _, v in train], SMOOTH)
    reached = next((s for (s, _), m in zip(train, smooth) if m >= threshold), None)
    final_train = statistics.fmean(v for _, v in train[-SMOOTH:])
    return {"steps_to_threshold": reached, "start_train_reward": statistics.fmean(v for _, v in train[:SMOOTH]),
            "final_train_reward": final_train, "start_eval": evals[0][1] if evals else None,
            "final_eval": evals[-1][1] if evals else None,
            "train_minus_eval": final_train - evals[-1][1] if evals else None,
            "curve": smooth, "eval_curve": evals}


def aggregate(per_seed: List[Dict[str, object]]) -> Dict[str, object]:
    def med(key):
        vals = [r[key] for r in per_seed if r[key] is not None]
        return statistics.median(vals) if vals else None
    return {"seeds": len(per_seed), "reached": sum(r["steps_to_threshold"] is not None for r in per_seed),
            "median_steps_to_threshold": med("steps_to_threshold"), "median_start_train": med("start_train_reward"),
            "median_final_train": med("final_train_reward"), "median_start_eval": med("start_eval"),
            "median_final_eval": med("final_eval"), "median_train_minus_eval": med("train_minus_eval")}


def table(summary: Dict[str, Dict[str, object]], threshold: float) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)
    lines = [f"| variant | seeds reaching {threshold} | median steps to it | train reward start -> end | "
             "held-out greedy start -> end | train - held-out |", "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        a = s["aggregate"]
        lines.append(f"| {name} | {a['reached']}/{a['seeds']} | {f(a['median_steps_to_threshold'], '{:.0f}')} | "
                     f"{f(a['median_start_train'])} -> {f(a['median_final_train'])} | "
                     f"{f(a['median_start_eval'])} -> {f(a['median_final_eval'])} | {f(a['median_train_minus_eval'])} |")
    return "\n".join(lines)


def plot(summary: Dict[str, Dict[str, object]], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in summary.items():
        curves = [r["curve"] for r in s["runs"]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        line, = ax1.plot(range(1, n + 1), mean, label=name)
        for c in curves:
            ax1.plot(range(1, len(c) + 1), c, color=line.get_color(), alpha=0.2, lw=0.8)
        points = {}
        for r in s["runs"]:
            for step, v in r["eval_curve"]:
                points.setdefault(step, []).append(v)
        xs = sorted(points)
        ax2.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", label=name, color=line.get_color())
    ax1.set_title(f"train reward ({SMOOTH}-step moving average; thin: seeds)")
    ax2.set_title("held-out greedy accuracy (mean over seeds)")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    shared = prepare_shared_inputs(args.config, out, args.overrides)
    summary: Dict[str, Dict[str, object]] = {}
    for name in args.variants:
        runs, walls = [], []
        variant = variant_overrides(name, args.config, args.overrides)
        for seed in args.seeds:
            run_dir = out / name / f"seed{seed}"
            walls.append(run_one(args.config, run_dir, args.steps, seed, shared + args.overrides + variant))
            runs.append(summarize_run(run_dir, args.threshold))
        summary[name] = {"overrides": variant, "wall_s": walls, "runs": runs, "aggregate": aggregate(runs)}
    text = table(summary, args.threshold)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "variants": summary}, indent=1))
    (out / "summary.md").write_text(text + "\n")
    print(text)
    print(f"[gift_vs_grpo] curves: {plot(summary, out)}; summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
