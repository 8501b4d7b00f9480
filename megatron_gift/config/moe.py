"""Run-config checks and Megatron settings of a mixture-of-experts run (model.moe_*, parallel.ep / etp).

Owns: refusing expert settings on a dense model and expert layouts the model cannot take (errors name the
key), and turning the model.moe_* keys into TransformerConfig overrides (the router defaults themselves,
fp32 router and no load-balancing loss, live in mcore/model.py's moe_kwargs). Pure Python.
"""
from __future__ import annotations

from typing import Any, Dict

from megatron_gift.hf.arch import HFArch


def check_moe_settings(arch: HFArch, model_cfg: Any, parallel: Any) -> None:
    """Raise ValueError naming the key when the run's expert settings do not fit the model."""
    moe_keys = {"parallel.ep": parallel.ep != 1, "parallel.etp": parallel.etp != 1,
                "model.moe_router_dtype": model_cfg.moe_router_dtype != "fp32",
                "model.moe_load_balancing": model_cfg.moe_load_balancing != "none",
                "model.moe_aux_loss_coeff": model_cfg.moe_aux_loss_coeff is not None}
    if arch.moe is None:
        used = [k for k, on in moe_keys.items() if on]
        if used:
            raise ValueError(f"{', '.join(used)}: set for a dense model ({arch.model_type}); expert settings need a "
                             "mixture-of-experts model (qwen3_moe, mixtral)")
        return
    if parallel.tp > 1 and parallel.ep > 1 and not parallel.sequence_parallel:
        # megatron-core refuses to train an MoE model with TP and EP but without sequence parallelism.
        raise ValueError(f"parallel.sequence_parallel: must be true with parallel.tp={parallel.tp} and "
                         f"parallel.ep={parallel.ep} (Megatron's MoE training needs it)")
    _check_aux_loss(arch, model_cfg, parallel)
    if arch.moe.num_experts % parallel.ep:
        raise ValueError(f"parallel.ep={parallel.ep} does not divide the model's {arch.moe.num_experts} experts")
    if parallel.ep == 1 and parallel.etp > parallel.tp:
        # megatron-core 0.16.1 marks experts expert-parallel (allreduce=False) only when EP > 1: at EP=1 their
        # gradients go through the dense buffer and are summed over data-parallel ranks that hold OTHER expert
        # shards (TP=1 x ETP=2: expert gradients off by 2.5e-2 against one process, the dense ones exact).
        raise ValueError(f"parallel.etp={parallel.etp} > parallel.tp={parallel.tp} needs parallel.ep > 1: at EP=1 "
                         "megatron-core 0.16.1 reduces the expert gradients over ranks holding other expert shards")
    if parallel.etp > 1 and arch.moe.ffn_hidden_size % parallel.etp:
        raise ValueError(f"parallel.etp={parallel.etp} does not divide the experts' width {arch.moe.ffn_hidden_size}")


def aux_loss_coeff(arch: HFArch, model_cfg: Any) -> float:
    """The load-balancing loss coefficient: model.moe_aux_loss_coeff, else the HF config's router_aux_loss_coef."""
    return arch.moe.aux_loss_coef if model_cfg.moe_aux_loss_coeff is None else float(model_cfg.moe_aux_loss_coeff)


def _check_aux_loss(arch: HFArch, model_cfg: Any, parallel: Any) -> None:
    if model_cfg.moe_load_balancing == "none":
        return
    if aux_loss_coeff(arch, model_cfg) <= 0:
        raise ValueError(f"model.moe_load_balancing: {model_cfg.moe_load_balancing} with a coefficient of 0 (the HF "
                         "config's router_aux_loss_coef); set model.moe_aux_loss_coeff > 0, or moe_load_balancing: none")
    if parallel.cp > 1:
        raise ValueError(f"model.moe_load_balancing: {model_cfg.moe_load_balancing} with parallel.cp={parallel.cp} is "
                         "not supported (untested); set moe_load_balancing: none or parallel.cp: 1")
    if parallel.recompute == "full":
        raise ValueError(f"model.moe_load_balancing: {model_cfg.moe_load_balancing} with parallel.recompute: full is "
                         "not supported (the router would be re-run in the backward pass with another microbatch's "
                         "coefficient, mcore/moe_aux.py); use recompute none or selective")
    if parallel.tp > 1 and not parallel.sequence_parallel:
        # without SP every TP rank routes all tokens and Megatron counts them once per TP rank in the loss
        raise ValueError(f"model.moe_load_balancing: {model_cfg.moe_load_balancing} with parallel.tp={parallel.tp} "
                         "needs parallel.sequence_parallel: true (as Megatron's MoE training does)")


def moe_overrides(arch: HFArch, model_cfg: Any) -> Dict[str, Any]:
    """TransformerConfig overrides from model.moe_* (empty for a dense model)."""
    if arch.moe is None:
        return {}
    return {"moe_router_load_balancing_type": model_cfg.moe_load_balancing,
            "moe_aux_loss_coeff": aux_loss_coeff(arch, model_cfg) if model_cfg.moe_load_balancing != "none" else 0.0,
            "moe_router_dtype": model_cfg.moe_router_dtype}
