"""Assembly: everything a training run is made of, built from a RunConfig on this rank.

Owns the order and the arguments of construction: the model directory (demo warm start, HF -> Megatron
conversion for TP / PP > 1), the data (tokenizer, prompt dataset, sampler, eval set), the rewards, the
loss, the policy (wrapped for training) and the frozen reference, the optimizer and LR schedule, the
GIFT schedule and this rank's rollout engine. Builds, never runs: the step loop is trainer.py's, the
checkpoint content checkpointing.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch.distributed as dist

from megatron_gift.algo import build_loss
from megatron_gift.algo.loss import needs_reference_model
from megatron_gift.config import routing_replay
from megatron_gift.config.moe import check_moe_settings, moe_overrides
from megatron_gift.config.run import RunConfig
from megatron_gift.data import PromptSampler, build_prompt_dataset, load_tokenizer
from megatron_gift.hf.arch import HFArch, load_hf_arch
from megatron_gift.mcore import dist_ckpt
from megatron_gift.mcore import runtime as rt_mod
from megatron_gift.mcore.convert import convert_for_model_parallel
from megatron_gift.mcore.model import recompute_kwargs
from megatron_gift.mcore.precision import transformer_precision_kwargs
from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
from megatron_gift.mcore.training import build_optimizer, wrap_for_training
from megatron_gift.rollout.colocated import EnginePlacement


def engine_placement(cfg: RunConfig, rank: int, world_size: int) -> EnginePlacement:
    """Where this rank's rollout engine sits (every rank hosts one; see rollout/colocated.py)."""
    return EnginePlacement(rank, world_size, int(cfg.rollout.engine.get("tensor_parallel_size", 1)))


def prepare_model_dir(cfg: RunConfig, rank: int, run_dir: Path, resuming: bool, log: Callable[[str], None]) -> None:
    """Warm-start the tiny demo model when no hf_dir is given, and convert hf_dir into a Megatron checkpoint
    when TP, PP, EP or ETP > 1 needs one and none is given (rank 0 makes both, the others wait). Updates cfg.model."""
    if not cfg.model.hf_dir:
        from megatron_gift.demo.warmstart import point_at_demo_inputs, prepare_demo_inputs
        if rank == 0:
            prepare_demo_inputs(cfg, str(run_dir), log=log)
        dist.barrier()
        if rank != 0:
            point_at_demo_inputs(cfg, str(run_dir))
    p = cfg.parallel
    arch = load_hf_arch(Path(cfg.model.hf_dir) / "config.json")
    check_moe_settings(arch, cfg.model, p)  # before converting
    routing_replay.check_routing_replay(arch, cfg)
    if not resuming and not cfg.model.mcore_dir and p.tp * p.pp * p.ep * p.etp > 1:
        out = run_dir / "mcore_from_hf"
        if rank == 0:
            convert_for_model_parallel(cfg.model.hf_dir, out, cfg.precision.dtype, cfg.model.vocab_multiple, log=log)
        dist.barrier()
        cfg.model.mcore_dir = str(out)


@dataclass
class DataParts:
    tokenizer: Any
    dataset: Any
    sampler: PromptSampler
    eval_set: Optional[Any]


def build_data(cfg: RunConfig) -> DataParts:
    tokenizer = load_tokenizer(cfg.model.hf_dir)
    dataset = build_prompt_dataset(cfg.data, tokenizer)
    eval_set = None
    if cfg.eval_data is not None and cfg.trainer.eval_every > 0:
        eval_set = build_prompt_dataset(cfg.eval_data, tokenizer)
    return DataParts(tokenizer, dataset, PromptSampler(dataset, seed=cfg.trainer.seed), eval_set)


@dataclass
class ModelParts:
    """The trained chunks (DDP-wrapped), the frozen reference (None unless the loss needs it), optimizer,
    LR schedule and the schedule that runs forward-backward over them."""

    model: List[Any]
    reference: Optional[Any]
    optimizer: Any
    scheduler: Any
    schedule: GiftSchedule


def build_models(cfg: RunConfig, arch: HFArch, loss, rt, weights_from_checkpoint: bool) -> ModelParts:
    """Policy (HF / Megatron weights, or empty when a checkpoint provides them), reference, optimizer, schedule."""
    kwargs = dict(arch=arch, hf_dir=cfg.model.hf_dir, mcore_dir=cfg.model.mcore_dir,
                  dtype=cfg.precision.torch_dtype, vocab_multiple=cfg.model.vocab_multiple, device=rt.device)
    extra = {k: v for k, v in transformer_precision_kwargs(cfg.precision).items() if k.startswith("fp8")}
    if cfg.parallel.sequence_parallel:
        extra["sequence_parallel"] = True
    extra.update(recompute_kwargs(cfg.parallel.recompute))
    extra.update(moe_overrides(arch, cfg.model))
    extra.update(routing_replay.model_overrides(cfg))
    if not weights_from_checkpoint:
        policy = rt_mod.build_stage_model(**kwargs, **extra)
    else:  # the checkpoint provides the weights (any layout, no model.mcore_dir needed for the policy)
        policy = dist_ckpt.build_stage_model_unloaded(arch, kwargs["dtype"], cfg.model.vocab_multiple,
                                                      rt.device, perform_initialization=False, **extra)
    reference = None
    if needs_reference_model(loss):
        reference = rt_mod.build_stage_model(**kwargs, **extra).requires_grad_(False).eval()
    cfg.optim.bf16 = cfg.precision.dtype == "bfloat16"
    cfg.optim.fp16 = cfg.precision.dtype == "float16"  # fp32 main weights and loss scaling (optim.loss_scale)
    cfg.optim.use_distributed_optimizer = cfg.parallel.use_distributed_optimizer
    model = wrap_for_training([policy], cfg.optim, rt.pg)
    optimizer, scheduler = build_optimizer(model, cfg.optim, rt.pg)
    settings = ScheduleSettings(vocab_size=arch.vocab_size, temperature=cfg.rollout.sampling.temperature or 1.0,
                                mode=cfg.loss.schedule)
    schedule = GiftSchedule(model, loss, settings, rt.pg)
    dist_ckpt.check_checkpointable(model, optimizer)  # fail now, not at the first save
    return ModelParts(model, reference, optimizer, scheduler, schedule)


def build_engine(cfg: RunConfig, placement: EnginePlacement):
    """This rank's engine (all ranks build theirs together: vLLM creates its groups over the world)."""
    from megatron_gift.rollout.vllm_config import VllmConfig
    from megatron_gift.rollout.vllm_engine import VllmEngine
    engine_cfg = dict(cfg.rollout.engine)
    engine_cfg.setdefault("seed", cfg.trainer.seed)
    engine_cfg.update(routing_replay.engine_overrides(cfg))
    if placement.engine_tp > 1:  # SPMD engines over the trainer's ranks
        engine_cfg.setdefault("distributed_executor_backend", "external_launcher")
    return VllmEngine(VllmConfig(model=cfg.model.hf_dir, **engine_cfg))


def build_loss_and_arch(cfg: RunConfig):
    return load_hf_arch(Path(cfg.model.hf_dir) / "config.json"), build_loss(cfg.loss.name, cfg.loss.options)
