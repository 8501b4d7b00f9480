"""Build a Megatron-Core GPTModel that computes exactly what a supported Hugging Face decoder computes.

Owns: HF config -> TransformerConfig (RMSNorm, SwiGLU, GQA, explicit head_dim, qkv bias, q/k norm,
RoPE base and scaling, tied embeddings, padded vocabulary) and the layer-spec choice (Transformer
Engine spec when TE imports and CUDA is available, the local spec otherwise, its core attention swapped for
torch SDPA: mcore/sdpa_attention.py; on CPU its linear layers' float32 GEMMs through oneDNN:
mcore/onednn_linear.py). The one place that
constructs GPTModel (megatron-core 0.19 deprecates it in favour of HybridModel: change it here only).
Does not own: parallel-state initialisation (mcore/parallel.py), weights (mcore/convert.py).

RoPE scaling: megatron-core 0.16.1's RotaryEmbedding applies Llama-3 scaling with only `factor` taken
from its arguments; low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 are
hard-coded defaults of `_apply_scaling`. Llama 3.1/3.2 use exactly those, but to be right for any
config the inverse frequencies are recomputed here with the config's values (tests compare them with
transformers' `rope_init_fn`). "linear" scaling maps to `seq_len_interpolation_factor` (positions / factor).
"""
from __future__ import annotations

import importlib.util
from dataclasses import fields, replace
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_gift.hf.arch import DEFAULT_VOCAB_MULTIPLE, HFArch, parse_hf_config
from megatron_gift.mcore.onednn_linear import use_onednn_linears

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# parallel.recompute -> TransformerConfig fields. "full": every layer keeps only its input and recomputes
# the rest in the backward pass; "selective": only the attention core (Megatron's "core_attn").
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def recompute_kwargs(mode: str) -> Dict[str, Any]:
    """TransformerConfig overrides for an activation-recompute mode (none, selective, full)."""
    if mode not in RECOMPUTE:
        raise ValueError(f"parallel.recompute is {mode!r}; valid: {', '.join(RECOMPUTE)}")
    return dict(RECOMPUTE[mode])


def resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def te_available() -> bool:
    """TE spec only where it can run: TE importable and a CUDA device present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def as_arch(hf_config: Any) -> HFArch:
    return hf_config if isinstance(hf_config, HFArch) else parse_hf_config(hf_config)


def moe_kwargs(arch: HFArch, *, ep: int = 1, etp: int = 1, use_te: bool) -> Dict[str, Any]:
    """TransformerConfig fields of an MoE family (empty for dense models).

    Routing reproduces HF: softmax over the logits' top-k (= renormalised top-k probabilities, Mixtral and
    Qwen3-MoE with norm_topk_prob) or top-k of the full softmax (norm_topk_prob false: moe_router_pre_softmax).
    RL defaults as the peers use them: router in fp32, load-balancing loss off (`none`; model.moe_load_balancing:
    aux_loss turns Megatron's Switch loss on, config/moe.py, weighted per token by mcore/moe_aux.py), no expert bias.
    Token dispatch: alltoall on CPU and GPU (on gloo through cpu_compat's split-size patch). Megatron's allgather
    dispatcher needs the same number of tokens on every expert-parallel rank, which data-parallel ranks holding
    microbatches of different lengths do not have (gloo aborted with "Received data size doesn't match expected
    size"); alltoall exchanges the split sizes first (tests/distributed/test_moe_aux_loss.py ep2).
    """
    moe = arch.moe
    if moe is None:
        return {}
    if moe.num_experts % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the model's {moe.num_experts} experts")
    return dict(
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_topk=moe.top_k,
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=moe.aux_loss_coef,
        moe_router_enable_expert_bias=False,
        moe_layer_freq=list(moe.layer_pattern),
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        moe_permute_fusion=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def transformer_config_from_hf(
    hf_config: Any,
    *,
    dtype: Any = torch.float32,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int = 1,
    on_cpu: Optional[bool] = None,
    use_te: Optional[bool] = None,
    **overrides: Any,
) -> TransformerConfig:
    """TransformerConfig reproducing the HF model; `overrides` are TransformerConfig fields (checked)."""
    arch = as_arch(hf_config)
    dtype = resolve_dtype(dtype)
    on_cpu = (not torch.cuda.is_available()) if on_cpu is None else on_cpu
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=on_cpu,
        # Fused kernels need TE / apex / CUDA; correctness first (a GPU recipe may override these).
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,  # needs apex
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        # The GIFT schedule's loss-scaling contract (mcore/schedule.py); set here, not only when wrapping for
        # training, because MoE routers read it once at construction (their aux-loss scaling, mcore/moe_aux.py).
        calculate_per_token_loss=True,
    )
    kwargs.update(moe_kwargs(arch, ep=ep, etp=etp, use_te=te_available() if use_te is None else use_te))
    valid = {f.name for f in fields(TransformerConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown TransformerConfig override(s) {unknown}")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(arch: HFArch, use_te: Optional[bool] = None, config: Optional[TransformerConfig] = None,
               vp_stage: Optional[int] = None):
    """Dense: one layer spec for every layer. MoE: this stage's block spec (MoE / dense layers per the
    config's moe_layer_freq; SequentialMLP experts locally, grouped-GEMM experts with Transformer Engine)."""
    use_te = te_available() if use_te is None else use_te
    if arch.moe is not None:
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm",
                                           vp_stage=vp_stage)
        block = _unfused_moe_norm_keys(block)
        return block if use_te else replace(block, layer_specs=[sdpa_core_attention(s) for s in block.layer_specs])
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return sdpa_core_attention(get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm"))


def sdpa_core_attention(spec):
    """A local-spec TransformerLayer spec with its core attention computed by torch SDPA (same weights, same
    state dict: the core attention holds no parameters)."""
    from megatron_gift.mcore.sdpa_attention import SdpaDotProductAttention

    attn = spec.submodules.self_attention
    attn = replace(attn, submodules=replace(attn.submodules, core_attention=SdpaDotProductAttention))
    return replace(spec, submodules=replace(spec.submodules, self_attention=attn))


def _unfused_moe_norm_keys(block):
    """The local spec saves every layer's pre_mlp_layernorm under the TE key mlp.linear_fc1.layer_norm_weight,
    but the TE spec's MoE layers keep a separate pre_mlp_layernorm (no fc1 to fuse into): drop that key
    mapping in MoE layers so a checkpoint saved on CPU (local spec) loads with the TE spec and back."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    specs = []
    for spec in block.layer_specs:
        sub = spec.submodules
        if getattr(sub.mlp, "module", None) is MoELayer and "pre_mlp_layernorm." in sub.sharded_state_dict_keys_map:
            keys = {k: v for k, v in sub.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."}
            spec = replace(spec, submodules=replace(sub, sharded_state_dict_keys_map=keys))
        specs.append(spec)
    return replace(block, layer_specs=specs)


def _fix_llama3_inv_freq(model: GPTModel, arch: HFArch) -> None:
    """Recompute Llama-3 inverse frequencies with the config's factors (Megatron hard-codes three of them)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or arch.rope.rope_type != "llama3":
        return
    dim = arch.head_dim
    base = 1.0 / (arch.rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim))
    rope.inv_freq = rope._apply_scaling(
        base,
        factor=arch.rope.factor,
        low_freq_factor=arch.rope.low_freq_factor,
        high_freq_factor=arch.rope.high_freq_factor,
        original_max_position_embeddings=arch.rope.original_max_position_embeddings,
    )


def _skip_init(weight: torch.Tensor) -> None:
    """An init method that leaves the tensor as allocated (the weights are loaded afterwards)."""


def _for_loading(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """`perform_initialization=False` as "weights will be loaded": Megatron still runs its initialisation
    code with init methods that do nothing, because that code is also what sets the parameter attributes
    Megatron relies on later (`tensor_model_parallel`, `partition_dim`, `partition_stride` for the grad norm
    and clipping, TP gathers, the distributed optimizer). megatron-core 0.16.1 sets them only when it
    initialises: a model built with perform_initialization=False counted TP rank 1's shards out of the
    grad norm (the first step after a TP=2 resume clipped with 25188893 instead of 29986361). The cost is
    Megatron's per-weight staging copy of the CPU-initialisation path (none on the GPU path); the random
    numbers are not drawn, so the RNG streams are untouched."""
    if overrides.get("perform_initialization", True):
        return overrides
    noop = dict(init_method=_skip_init, output_layer_init_method=_skip_init, embedding_init_method=_skip_init)
    return {**noop, **overrides, "perform_initialization": True}


def build_gpt_model(
    hf_config: Any,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    dtype: Any = torch.float32,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
    use_te: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    **config_overrides: Any,
) -> GPTModel:
    """GPTModel for this rank's pipeline stage (parallel state must be initialised).

    pre_process / post_process default to this rank being the first / last pipeline stage.
    The model's vocabulary is padded to a multiple of `vocab_multiple` (default 128, which any
    power-of-two TP size up to 128 divides, so one checkpoint serves every TP layout).
    `perform_initialization=False`: the weights are left uninitialised (they are loaded next) and every
    parameter attribute is the one a fresh build has (see `_for_loading`).
    """
    arch = as_arch(hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    use_te = te_available() if use_te is None else use_te
    padded_vocab = arch.padded_vocab_size(vocab_multiple)
    if padded_vocab % tp:
        raise ValueError(f"padded vocabulary {padded_vocab} (multiple {vocab_multiple}) is not divisible by TP={tp}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    config = transformer_config_from_hf(arch, dtype=dtype, tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, use_te=use_te,
                                        **_for_loading(config_overrides))
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te, config, vp_stage),
        vocab_size=padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope.theta,
        rope_scaling=arch.rope.rope_type == "llama3",
        rope_scaling_factor=arch.rope.factor,
        seq_len_interpolation_factor=arch.rope.factor if arch.rope.rope_type == "linear" else None,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        # As Megatron-LM's get_model: modules built outside Megatron's parallel layers (the local
        # spec's torch norms) are created on the host; move everything to this rank's device.
        model.cuda(torch.cuda.current_device())
    elif not torch.cuda.is_available():
        use_onednn_linears(model)  # CPU float32 GEMMs through oneDNN (mcore/onednn_linear.py)
    _fix_llama3_inv_freq(model, arch)
    return model
