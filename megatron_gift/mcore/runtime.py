"""Process start-up for a training job and the policy / reference models of this rank.

Owns: joining torch.distributed from torchrun's environment (or as a single process), NCCL on GPUs and
gloo plus the CPU compatibility layer otherwise, Megatron parallel state for the run's layout, and
building this rank's model stage with the run's weights (an HF directory at TP = PP = 1, or a converted
Megatron checkpoint at any layout). Where rollout engines sit is rollout/colocated.py's business.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_gift.hf.files import HFReader
from megatron_gift.hf.arch import HFArch
from megatron_gift.mcore.convert import copy_hf_into_model, load_mcore_checkpoint
from megatron_gift.mcore.model import build_gpt_model
from megatron_gift.mcore.parallel import destroy_parallel, initialize_parallel
from megatron_gift.utils.device import compute_device


@dataclass
class Runtime:
    """This process's place in the job."""

    rank: int
    world_size: int
    dp: int
    dp_rank: int
    pg: Any  # ProcessGroupCollection
    device: torch.device
    _stack: contextlib.ExitStack

    @property
    def is_logger(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        destroy_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._stack.close()


def start(tp: int = 1, pp: int = 1, cp: int = 1, vpp: Optional[int] = None, seed: int = 1234,
          timeout_s: float = 1800.0, ep: int = 1, etp: int = 1) -> Runtime:
    """Join (or create) the process group from RANK / WORLD_SIZE / MASTER_* and set up Megatron."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    stack = contextlib.ExitStack()
    # Defaults for a job started without a launcher, taken back by close(): a process that runs a trainer
    # in-process (a test, a notebook) must not hand its port to the jobs it starts later.
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        stack.callback(_restore_env, key, os.environ.get(key))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # single process: any free port, so several runs can share a host
        from megatron_gift.mcore.testing.harness import free_port
        os.environ["MASTER_PORT"] = str(free_port() if world == 1 else 29500)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        from megatron_gift.mcore.cpu_compat import enable_cpu_compat
        stack.enter_context(enable_cpu_compat())
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    initialize_parallel(tp, pp, cp, vpp, seed=seed, ep=ep, etp=etp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    device = compute_device()
    return Runtime(rank=rank, world_size=world, dp=dp, dp_rank=dp_rank,
                   pg=ProcessGroupCollection.use_mpu_process_groups(), device=device, _stack=stack)


def _restore_env(key: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def build_stage_model(arch: HFArch, hf_dir: str, mcore_dir: Optional[str], dtype: torch.dtype,
                      vocab_multiple: int, device: torch.device, **overrides: Any):
    """This rank's pipeline stage with the run's initial weights."""
    model = build_gpt_model(arch, dtype=dtype, vocab_multiple=vocab_multiple, **overrides)
    if mcore_dir:
        load_mcore_checkpoint(model, Path(mcore_dir))
    elif ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1 \
            and ps.get_expert_model_parallel_world_size() == 1 and ps.get_expert_tensor_parallel_world_size() == 1:
        reader = HFReader(Path(hf_dir))
        try:
            copy_hf_into_model(model, arch, reader.get, vocab_multiple=vocab_multiple)
        finally:
            reader.close()
    else:
        raise ValueError("TP, PP, EP or ETP > 1 loads a converted Megatron checkpoint: run megatron-gift-convert-hf-to-mcore "
                         f"--hf-dir {hf_dir} --out DIR and set model.mcore_dir: DIR")
    return model.to(device)
