"""Wrapping built Megatron model chunks for training: DDP, optimizer, LR schedule, grad finalisation.

Owns the Megatron-LM set-up steps that sit between "a GPTModel exists" and "the schedule can run a
step": Float16Module for bf16/fp16, DistributedDataParallel (grad buffers, optional overlap and
distributed optimizer), get_megatron_optimizer with gradient clipping on by default, the
OptimizerParamScheduler, and the model-config hooks the schedule relies on
(finalize_model_grads_func, grad_scale_func, calculate_per_token_loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_model_config


@dataclass
class OptimSettings:
    """AdamW and LR-schedule settings (the GIFT recipe: lr 3e-6, clip 1.0, no weight decay by default)."""

    lr: float = 3e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int = 1_000_000
    decay_style: str = "constant"
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bf16: bool = False
    # fp16 (set from precision.dtype by the trainer): fp32 main weights, loss scaling. loss_scale None:
    # dynamic (start at initial_loss_scale, halve after `hysteresis` overflowing updates, which are skipped
    # and redone on the same batch by `step_until_no_overflow`, double after loss_scale_window clean ones,
    # never below min_loss_scale); a number: static. GIFT's first update of a rollout batch with anchor `old`
    # has implicit std 0, so coefficients ~ 1/eps: its gradients fit fp16 only at scales well below 1.
    fp16: bool = False
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0 ** 16
    min_loss_scale: float = 2.0 ** -24
    loss_scale_window: int = 1000
    hysteresis: int = 1

    def __post_init__(self):
        if self.lr <= 0 or self.clip_grad < 0:
            raise ValueError(f"optimizer lr must be > 0 and clip_grad >= 0, got lr={self.lr}, clip_grad={self.clip_grad}")
        if self.decay_style not in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
            raise ValueError(f"unknown lr decay_style {self.decay_style!r}")
        if self.loss_scale is not None and not self.loss_scale > 0:
            raise ValueError(f"optim.loss_scale must be > 0 (or null: dynamic), got {self.loss_scale!r}")
        if not 0 < self.min_loss_scale <= self.initial_loss_scale or self.loss_scale_window < 1 or self.hysteresis < 1:
            raise ValueError("optim: need 0 < min_loss_scale <= initial_loss_scale, loss_scale_window >= 1 and "
                             f"hysteresis >= 1, got {self.min_loss_scale}, {self.initial_loss_scale}, "
                             f"{self.loss_scale_window}, {self.hysteresis}")
        if self.bf16 and self.fp16:
            raise ValueError("optim: bf16 and fp16 are exclusive")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


def wrap_for_training(chunks: List[torch.nn.Module], settings: OptimSettings, pg=None) -> List[DistributedDataParallel]:
    """Float16Module (bf16 / fp16) and DDP around each model chunk; sets calculate_per_token_loss on the config."""
    config = get_model_config(chunks[0])
    config.calculate_per_token_loss = True  # the schedule's loss-scaling contract (mcore/schedule.py)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=settings.overlap_grad_reduce,
        overlap_param_gather=settings.overlap_param_gather,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        # fp16: an overflowing loss scale makes inf / NaN gradients by design; the optimizer's loss scaler
        # finds them, skips the step and backs off (a NaN check here would abort instead).
        check_for_nan_in_grad=not settings.fp16)
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if settings.bf16 or settings.fp16 else chunk
        kwargs = {"pg_collection": pg} if pg is not None else {}
        wrapped.append(DistributedDataParallel(config, ddp_config, module, disable_bucketing=i > 0, **kwargs))
    return wrapped


def build_optimizer(model: List[DistributedDataParallel], settings: OptimSettings, pg=None):
    """Megatron optimizer (AdamW) + param scheduler; installs the config hooks the schedule needs."""
    opt_config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, bf16=settings.bf16, fp16=settings.fp16, params_dtype=settings.params_dtype,
        loss_scale=settings.loss_scale, initial_loss_scale=settings.initial_loss_scale,
        min_loss_scale=settings.min_loss_scale, loss_scale_window=settings.loss_scale_window,
        hysteresis=settings.hysteresis, use_distributed_optimizer=settings.use_distributed_optimizer)
    # Megatron refuses an explicit pg_collection together with its gloo helper groups (used by the
    # distributed optimizer's checkpointing), so the optimizer takes parallel_state's groups.
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr, min_lr=settings.min_lr,
        lr_warmup_steps=settings.warmup_steps, lr_decay_steps=settings.decay_steps, lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=settings.decay_steps,
        wd_incr_style="constant")
    config = get_model_config(model[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if settings.overlap_grad_reduce:
        config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if settings.overlap_param_gather:
        config.param_sync_func = [m.start_param_sync for m in model] if len(model) > 1 else model[0].start_param_sync
    return optimizer, scheduler


def step_until_no_overflow(step: Callable[[], Any], optimizer, settings: OptimSettings) -> Tuple[Any, int]:
    """Run `step()` (forward-backward + optimizer step, returning a result with `update_successful`); under
    fp16 an overflowing step, which the optimizer skipped after lowering the loss scale, is redone on the same
    batch (no rollout is wasted) until it fits. Returns (result, redone steps). Every rank agrees on the
    overflow (Megatron reduces it over the model-parallel group; gradients are already data-parallel reduced).
    An overflow at optim.min_loss_scale (or with a static optim.loss_scale) is an error, not an endless loop."""
    result, redone = step(), 0
    while settings.fp16 and not result.update_successful:
        scale = float(optimizer.get_loss_scale())
        if settings.loss_scale is not None or scale <= settings.min_loss_scale:
            raise FloatingPointError(
                f"fp16 gradients are not finite at loss scale {scale:g} (optim.loss_scale={settings.loss_scale}, "
                f"optim.min_loss_scale={settings.min_loss_scale:g}): lower the scale, or train in bfloat16")
        result, redone = step(), redone + 1
    return result, redone
