"""Checks of a run config against a world size, and the plan the memory estimate runs on.

Owns: every divisibility and size rule a layout must meet before Megatron or vLLM would fail on the
cluster (world vs tp*pp*cp, heads / KV heads / FFN / padded vocabulary vs TP, layers vs PP and virtual
PP, whole prompt groups vs DP x microbatches, microbatches vs PP, sequence vs CP / sequence-parallel
splits, vLLM TP and context length), each error naming the run-config key to change. It reuses
ParallelConfig / RunConfig.check_world for the rules they already own.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from megatron_gift.algo.packing import pack_microbatches
from megatron_gift.algo.registry import build_loss
from megatron_gift.algo.loss import needs_reference_model
from megatron_gift.hf.arch import HFArch
from megatron_gift.planning.memory import TrainPlan, VllmPlan
from megatron_gift.config.moe import check_moe_settings
from megatron_gift.config.routing_replay import check_routing_replay
from megatron_gift.config.run import RunConfig

# The trainer pads every microbatch to a multiple of this many tokens (algo/packing.py's default).
PAD_MULTIPLE = inspect.signature(pack_microbatches).parameters["pad_to_multiple"].default
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


@dataclass
class LayoutReport:
    world_size: int
    gpus_per_node: int
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    plan: Optional[TrainPlan] = None
    vllm: Optional[VllmPlan] = None

    @property
    def ok(self) -> bool:
        return not self.errors


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_layout(cfg: RunConfig, arch: HFArch, arch_path: str, nodes: int, gpus_per_node: int,
                 attention: str = "te", recompute: str = "none") -> LayoutReport:
    """All layout errors and warnings for `nodes` x `gpus_per_node` GPUs; the plan when the layout is sound."""
    world = nodes * gpus_per_node
    rep = LayoutReport(world_size=world, gpus_per_node=gpus_per_node)
    par, t = cfg.parallel, cfg.trainer
    err, warn = rep.errors.append, rep.warnings.append
    try:
        dp = par.data_parallel_size(world)
    except ValueError as exc:
        err(f"parallel.tp / parallel.pp / parallel.cp: {exc} ({nodes} nodes x {gpus_per_node} GPUs)")
        dp = None
    _check_model_split(cfg, arch, arch_path, err)
    try:
        check_moe_settings(arch, cfg.model, par)
        check_routing_replay(arch, cfg, engine_check=False)  # the cluster's vLLM, not this machine's, returns routes
    except ValueError as exc:
        err(f"{exc} ({arch_path})")
    seq_len = round_up(cfg.data.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens, PAD_MULTIPLE)
    _check_sequence(cfg, arch, arch_path, seq_len, attention, err)
    _check_checkpoint(cfg, err, warn)
    vllm = _check_vllm(cfg, arch, arch_path, gpus_per_node, err)
    if dp is not None:
        try:
            cfg.check_world(world)
        except ValueError as exc:
            err(f"trainer.prompts_per_step / trainer.updates_per_rollout / trainer.microbatches: {exc}")
    _check_pipeline(cfg, err, warn)
    if rep.errors:
        return rep
    loss = build_loss(cfg.loss.name, cfg.loss.options)
    groups_per_mb = t.prompts_per_step // t.updates_per_rollout // (dp * t.microbatches)
    rep.vllm = vllm
    rep.plan = TrainPlan(
        arch=arch, tp=par.tp, pp=par.pp, cp=par.cp, dp=dp, vpp=par.vpp, sequence_parallel=par.sequence_parallel,
        distributed_optimizer=par.use_distributed_optimizer, dtype_bytes=_DTYPE_BYTES[cfg.precision.dtype],
        microbatches=t.microbatches, seqs_per_microbatch=groups_per_mb * t.responses_per_prompt, seq_len=seq_len,
        vocab_multiple=cfg.model.vocab_multiple,
        reference_copy=needs_reference_model(loss),
        attention=attention, recompute=recompute, ep=par.ep, etp=par.etp)
    return rep


def _check_model_split(cfg: RunConfig, arch: HFArch, where: str, err) -> None:
    tp, pp, vpp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp
    for key, value in (("num_attention_heads", arch.num_heads), ("num_key_value_heads", arch.num_kv_heads),
                       ("intermediate_size", arch.ffn_hidden_size)):
        if value % tp:
            err(f"parallel.tp={tp}: {key}={value} in {where} is not divisible by it")
    padded = arch.padded_vocab_size(cfg.model.vocab_multiple)
    if padded % tp:
        err(f"model.vocab_multiple={cfg.model.vocab_multiple}: the padded vocabulary {padded} is not divisible by "
            f"parallel.tp={tp} (use a multiple of 128)")
    stages = pp * (vpp or 1)
    if arch.num_layers % stages:
        key = "parallel.pp" if vpp is None else "parallel.pp x parallel.vpp"
        err(f"{key}={stages}: num_hidden_layers={arch.num_layers} in {where} is not divisible by it")


def _check_sequence(cfg: RunConfig, arch: HFArch, where: str, seq_len: int, attention: str, err) -> None:
    tp, cp, sp = cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.sequence_parallel
    longest = cfg.data.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens
    if longest > arch.max_position_embeddings:
        err(f"data.max_prompt_tokens + rollout.sampling.max_new_tokens = {longest} exceeds "
            f"max_position_embeddings={arch.max_position_embeddings} in {where}")
    if cp > 1 and PAD_MULTIPLE % (2 * cp):
        err(f"parallel.cp={cp}: context parallelism splits each sequence into 2*cp={2 * cp} chunks, but the trainer "
            f"pads sequences to a multiple of {PAD_MULTIPLE} (algo/packing.py)")
    if sp and PAD_MULTIPLE % (tp * cp):
        err(f"parallel.sequence_parallel with parallel.tp={tp} x parallel.cp={cp}: each CP rank's sequence must split "
            f"over {tp} TP ranks, but sequences are padded to a multiple of {PAD_MULTIPLE} only")
    if cp > 1 and attention == "local":
        err(f"parallel.cp={cp}: context parallelism needs Transformer Engine attention; the local spec "
            "(no TE) refuses it")


def _check_checkpoint(cfg: RunConfig, err, warn) -> None:
    par, m = cfg.parallel, cfg.model
    if par.tp * par.pp * par.ep * par.etp > 1 and not m.mcore_dir:
        err(f"model.mcore_dir is empty: TP={par.tp} x PP={par.pp} x EP={par.ep} x ETP={par.etp} loads a converted "
            "Megatron checkpoint (megatron-gift-convert-hf-to-mcore)")
    elif m.mcore_dir and not Path(m.mcore_dir).exists():
        warn(f"model.mcore_dir '{m.mcore_dir}' does not exist here (make it on the cluster with "
             "megatron-gift-convert-hf-to-mcore)")
    if m.hf_dir and not any(Path(m.hf_dir).glob("*.safetensors")):
        warn(f"model.hf_dir '{m.hf_dir}' holds no weights (*.safetensors): fine for this dry run; the real run "
             "needs --set model.hf_dir=<the checkpoint>")


def _check_vllm(cfg: RunConfig, arch: HFArch, where: str, gpus_per_node: int, err) -> Optional[VllmPlan]:
    from megatron_gift.rollout.vllm_config import VllmConfig
    try:
        v = VllmConfig(model=cfg.model.hf_dir, **cfg.rollout.engine)
    except TypeError as exc:
        err(f"rollout.engine: {exc}")
        return None
    except ValueError as exc:
        err(f"rollout.engine: {exc}")
        return None
    longest = cfg.data.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens
    if v.max_model_len < longest:
        err(f"rollout.engine.max_model_len={v.max_model_len} < data.max_prompt_tokens + "
            f"rollout.sampling.max_new_tokens = {longest}")
    if arch.num_heads % v.tensor_parallel_size:
        err(f"rollout.engine.tensor_parallel_size={v.tensor_parallel_size}: num_attention_heads={arch.num_heads} "
            f"in {where} is not divisible by it")
    if v.tensor_parallel_size > gpus_per_node or gpus_per_node % v.tensor_parallel_size:
        err(f"rollout.engine.tensor_parallel_size={v.tensor_parallel_size} must divide the {gpus_per_node} GPUs per "
            "node (every rank hosts a share of an engine, and an engine stays on its node)")
    return VllmPlan(tensor_parallel_size=v.tensor_parallel_size, dtype_bytes=_DTYPE_BYTES[v.dtype],
                    gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_bytes=v.kv_cache_bytes,
                    max_model_len=v.max_model_len, sleeps=v.sleep_enabled(on_gpu=True))


def _check_pipeline(cfg: RunConfig, err, warn) -> None:
    pp, vpp, m = cfg.parallel.pp, cfg.parallel.vpp, cfg.trainer.microbatches
    if pp == 1:
        return
    if vpp is not None and (m < pp or m % pp):
        err(f"trainer.microbatches={m}: the interleaved schedule (parallel.vpp={vpp}) needs a multiple of "
            f"parallel.pp={pp} microbatches")
    elif m < pp:
        warn(f"trainer.microbatches={m} < parallel.pp={pp}: stages idle most of the step")
    bubble = (pp - 1) / ((vpp or 1) * m)
    if bubble > 0.25:
        warn(f"pipeline bubble (pp-1)/(v*m) = {bubble:.2f} of compute time: raise trainer.microbatches")
