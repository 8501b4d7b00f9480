"""Reporting: the per-step metrics sinks and the console's step line.

Owns the run directory's `metrics.jsonl` format: one JSON object per step with `step` and float
values; nothing else writes it. Only the logging rank creates a MetricsLog. Sinks: a jsonl file
(always), tensorboard (when importable), wandb (when asked). Also the step line (progress bar, reward,
loss, time, ETA, phase times) and the ETA clock it reads.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional


class MetricsLog:
    """resume_step None: a fresh run (an existing metrics.jsonl is kept aside as metrics.jsonl.prev-<time>,
    never overwritten). An int: a resumed run; the history is the rows up to that step, taken from
    `history` (the checkpoint's copy) when given, else from the existing file; later rows are dropped
    (the resumed run recomputes them). TensorBoard follows: a fresh run sets an existing event directory aside
    (tensorboard.prev-<time>, so two runs' streams never mix), a resumed run purges the events after
    resume_step (SummaryWriter's purge_step: the steps between the checkpoint and a kill are not shown twice)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: Optional[str] = None,
                 resume_step: Optional[int] = None, history: Optional[str | Path] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._set_aside()
        else:
            self._trim(resume_step, Path(history) if history else self.path)
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                tb_dir = Path(run_dir) / "tensorboard"
                if resume_step is None and tb_dir.is_dir() and any(tb_dir.iterdir()):
                    tb_dir.replace(tb_dir.with_name(f"tensorboard.prev-{int(time.time())}"))
                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(str(tb_dir), purge_step=purge)
            except ImportError:
                self._tb = None
        if wandb_project:
            import wandb  # asked for explicitly: a missing package is an error, not a silent skip
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir))

    def _set_aside(self) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.prev-{int(time.time())}"))

    def _trim(self, resume_step: int, source: Path) -> None:
        """Rows of steps <= resume_step from `source`, written atomically to metrics.jsonl."""
        if not source.exists():
            return
        keep = [ln for ln in source.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(self.path)

    def log(self, step: int, values: Dict[str, float]) -> None:
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in values.items()}
        self._fh.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list:
    """All rows of a metrics.jsonl (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """A fixed-width text bar for the step line, e.g. `[#####---------------] 25%`."""
    frac = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
    filled = int(round(frac * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {int(frac * 100):3d}%"


class EtaClock:
    """Remaining wall time at the mean step time of this process's run so far (evals included)."""

    def __init__(self, first_step: int, clock=time.perf_counter):
        self.first_step, self._clock = first_step, clock
        self._t0 = clock()

    def eta(self, step: int, total: int) -> str:
        done = step - self.first_step
        seconds = (self._clock() - self._t0) / max(done, 1) * (total - step)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def step_line(step: int, total: int, values: Dict[str, float], eta: str) -> str:
    """The console line of one step: progress, reward, eval reward, loss, step time, ETA, phase times."""
    ev = f" eval {values['eval/reward_mean']:.3f}" if "eval/reward_mean" in values else ""
    return (f"[train] step {step}/{total} {progress_bar(step, total)} reward {values['reward_mean']:.3f}{ev} "
            f"loss {values.get('loss', float('nan')):.4f} time {values['step_time_s']:.1f}s eta {eta} "
            + " ".join(f"{k[5:-2]}={v:.1f}s" for k, v in values.items() if k.startswith("time/")))


# What explains a loss's behaviour across the updates of one rollout batch (GIFT's implicit term is live from
# the second update on with anchor `old`): logged per update index when trainer.updates_per_rollout > 1.
PER_UPDATE_KEYS = ("loss", "grad_norm", "rho", "tiny_implicit_std_frac", "abs_residual", "clip_frac")


def per_update_metrics(update: int, values: Dict[str, float]) -> Dict[str, float]:
    """`update{k}/<name>` copies of the per-update diagnostics present in `values` (grad_norm is Megatron's
    norm before clipping)."""
    return {f"update{update}/{k}": values[k] for k in PER_UPDATE_KEYS if k in values}
