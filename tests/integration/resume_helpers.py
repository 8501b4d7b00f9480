"""Helpers for the resume tests: one tiny warm-started model shared by every run, the trainer as a subprocess,
and layout-free views of a checkpoint (its tensors, its plain state, the metrics without timings)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "examples" / "tiny_cpu.yaml")
WARM = ["warmstart.steps=120", "warmstart.hidden_size=128", "warmstart.intermediate_size=176",
        "warmstart.num_layers=2", "warmstart.task_n_train=64", "warmstart.task_n_eval=8",
        "warmstart.task_max_operand=20"]
# Keys whose values are wall-clock measurements: everything else in metrics.jsonl must match bitwise.
TIMING_KEYS = ("step_time_s", "tokens_per_s")
# The 120-step warm start answers some problems at temperature 1 (step rewards 0-0.4) and a partial-credit
# format term adds reward variance, so the steps have non-zero losses that move the weights.
REWARDS = ("rewards.terms=[{name: math_verify, weight: 1.0}, "
           "{name: format, weight: 0.5, kwargs: {pattern: '####'}}]")


def make_warm_model(root: Path) -> Dict[str, str]:
    """The tiny Llama and its arithmetic data, made once (what the trainer's warm start would make)."""
    from megatron_gift.data import make_arithmetic_dataset
    from megatron_gift.data.builtin import builtin_arithmetic_paths
    from megatron_gift.config.run import load_run_config
    from megatron_gift.demo.warmstart import make_warmstart_model

    cfg = load_run_config(CONFIG, WARM)
    ws = cfg.warmstart
    paths = make_arithmetic_dataset(str(root / "data"), ws.task_n_train, ws.task_n_eval, seed=ws.seed,
                                    max_operand=ws.task_max_operand)
    cfg.data.path = paths["train"]
    make_warmstart_model(ws, cfg.data, builtin_arithmetic_paths()["tokenizer"], str(root / "warm"), log=lambda m: None)
    return {"hf_dir": str(root / "warm"), "train": paths["train"], "eval": paths["eval"]}


def run_overrides(warm: Dict[str, str], run_dir: Path, steps: int, save_every: int = 2,
                  extra: Optional[List[str]] = None) -> List[str]:
    return [f"model.hf_dir={warm['hf_dir']}", f"data.path={warm['train']}", f"eval_data.path={warm['eval']}",
            f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", f"trainer.save_every={save_every}",
            "trainer.prompts_per_step=4", "trainer.responses_per_prompt=4", "trainer.microbatches=2",
            "trainer.eval_every=2", "trainer.eval_prompts=4", "rollout.sampling.max_new_tokens=16",
            "optim.lr=1.0e-3", REWARDS, "loss.name=gift",
            "loss.options={beta: 1.0, grad_mode: detached, anchor: old}"] + list(extra or [])


def train_command(overrides: List[str], nproc: int = 1, port: Optional[int] = None) -> List[str]:
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_gift.train", CONFIG]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), "-m", "megatron_gift.train", CONFIG]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def train_env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_train(overrides: List[str], nproc: int = 1, port: Optional[int] = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(overrides, nproc, port), capture_output=True, text=True, timeout=timeout,
                          env=train_env(), cwd=str(ROOT))


def run_until(overrides: List[str], marker: str, sig: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """Start a run in its own process group, send `sig` once a stdout line contains `marker`, wait for the end.

    SIGKILL goes to the whole group (like a node failure: the trainer and every helper process it started);
    other signals to the trainer only (its own handlers must do the work). Leftover children are killed.
    """
    proc = subprocess.Popen(train_command(overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=train_env(), cwd=str(ROOT), start_new_session=True)
    lines: List[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline, sent = time.monotonic() + timeout, False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(marker in ln for ln in list(lines)):
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.send_signal(sig)
                sent = True
                break
            time.sleep(0.05)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helper processes that outlived the trainer
        except ProcessLookupError:
            pass
        proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    assert sent, f"the run never printed {marker!r} (exit code {proc.returncode}):\n{out[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def checkpoint_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint (weights and optimizer state) as full tensors, by key."""
    from megatron_gift.mcore.dist_ckpt import canonical_checkpoint_tensors
    return canonical_checkpoint_tensors(path / "model")


def checkpoint_plain(path: Path) -> dict:
    """The non-tensor part: step, LR schedule, sampler position ('gift'), optimizer param groups ('optimizer')."""
    return torch.load(path / "model" / "common.pt", weights_only=False)


def metrics_rows(run_dir: Path) -> List[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in TIMING_KEYS} for r in rows]
