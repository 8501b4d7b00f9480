"""Per-step metrics sinks: a jsonl file (always), tensorboard (when importable), wandb (when asked).

Owns the run directory's `metrics.jsonl` format: one JSON object per step with `step` and float
values; nothing else writes it. Only the logging rank creates a MetricsLog.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional


class MetricsLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: Optional[str] = None,
                 resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._trim(resume_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self._tb = None
        if wandb_project:
            import wandb  # asked for explicitly: a missing package is an error, not a silent skip
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir))

    def _trim(self, resume_step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be recomputed)."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

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
