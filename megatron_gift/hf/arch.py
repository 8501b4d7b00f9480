"""Parse and validate a Hugging Face decoder config into the few numbers the Megatron side needs.

Owns: the list of supported families (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, and the mixture-of-experts
families Qwen3-MoE and Mixtral, whose routing is read into MoESpec), the checks that refuse
configs this project cannot reproduce exactly (sliding-window attention in use, unknown RoPE scaling,
biases Megatron's dense layer has no slot for, non-SiLU activations), and vocabulary padding.
Does not own: Megatron's TransformerConfig (mcore/model.py) or tensor names (checkpoint/mapping.py).
Pure Python: reads a config.json dict (transformers 4 or 5 layout) or a transformers config object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# A multiple of 128 is divisible by every power-of-two TP size up to 128, so one padded vocabulary
# serves every TP layout and the converted checkpoint loads under any TP without re-padding.
DEFAULT_VOCAB_MULTIPLE = 128


class UnsupportedConfigError(ValueError):
    """The HF config asks for something the Megatron model built here cannot reproduce exactly."""


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MoESpec:
    """Routed experts of a mixture-of-experts decoder (no shared experts; softmax top-k routing)."""

    num_experts: int
    top_k: int
    ffn_hidden_size: int  # per expert
    norm_topk_prob: bool  # renormalise the top-k probabilities (Mixtral always does)
    layer_pattern: Tuple[int, ...]  # per layer: 1 = MoE block, 0 = dense MLP (intermediate_size)
    aux_loss_coef: float  # the HF config's router_aux_loss_coef (used only if the run enables the loss)

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.layer_pattern[i])


@dataclass(frozen=True)
class HFArch:
    """The architecture of one supported HF decoder, as the converters and the model builder need it."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope: RopeSpec
    moe: Optional[MoESpec] = None

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def padded_vocab_size(self, multiple: int = DEFAULT_VOCAB_MULTIPLE) -> int:
        return -(-self.vocab_size // multiple) * multiple


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise TypeError(f"expected a config.json dict or a transformers config, got {type(cfg).__name__}")


def _require(d: dict, key: str, where: str) -> Any:
    if d.get(key) is None:
        raise UnsupportedConfigError(f"{where}: required field {key!r} is missing")
    return d[key]


def _parse_rope(d: dict, where: str) -> RopeSpec:
    # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; 4.x wrote rope_theta + rope_scaling.
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{where}: rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    factor = float(_require(merged, "factor", f"{where} rope scaling"))
    if rope_type == "linear":
        return RopeSpec(theta=float(theta), rope_type="linear", factor=factor)
    return RopeSpec(
        theta=float(theta),
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(_require(merged, "low_freq_factor", f"{where} rope scaling")),
        high_freq_factor=float(_require(merged, "high_freq_factor", f"{where} rope scaling")),
        original_max_position_embeddings=int(
            _require(merged, "original_max_position_embeddings", f"{where} rope scaling")
        ),
    )


def _check_sliding_window(d: dict, model_type: str, where: str) -> None:
    window = d.get("sliding_window")
    max_pos = int(d.get("max_position_embeddings") or 0)
    if model_type in ("mistral", "mixtral"):
        if window is not None and int(window) < max_pos:
            raise UnsupportedConfigError(
                f"{where}: sliding_window={window} < max_position_embeddings={max_pos} (sliding-window attention "
                "is in use; Megatron's dense attention here is full-causal). Set sliding_window to null only if "
                "every sequence you train on is at most the window."
            )
        return
    layer_types = d.get("layer_types") or []
    uses_window = bool(d.get("use_sliding_window")) or any(t != "full_attention" for t in layer_types)
    if uses_window:
        raise UnsupportedConfigError(
            f"{where}: sliding-window attention is in use (use_sliding_window={d.get('use_sliding_window')}, "
            f"layer_types={sorted(set(layer_types))}); only full attention is supported"
        )


def _check_unsupported_fields(d: dict, model_type: str, where: str) -> None:
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"{where}: hidden_act={act!r} is not supported (only 'silu', i.e. SwiGLU)")
    if model_type != "qwen2" and d.get("attention_bias"):
        # Llama/Qwen3 attention_bias also biases o_proj, which Megatron's add_qkv_bias does not cover.
        raise UnsupportedConfigError(f"{where}: attention_bias=true is not supported for {model_type}")
    if d.get("mlp_bias"):
        raise UnsupportedConfigError(f"{where}: mlp_bias=true is not supported")
    if model_type not in MOE_MODEL_TYPES and int(d.get("num_experts", 0) or d.get("num_local_experts", 0) or 0) > 0:
        raise UnsupportedConfigError(f"{where}: num_experts > 0 in a {model_type} config; mixture-of-experts "
                                     f"models are supported as model_type {' or '.join(MOE_MODEL_TYPES)}")


def _parse_moe(d: dict, model_type: str, where: str) -> Optional[MoESpec]:
    """Routed-expert settings of qwen3_moe / mixtral; features without an exact Megatron equivalent refused."""
    if model_type not in MOE_MODEL_TYPES:
        return None
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if d.get(key):
            raise UnsupportedConfigError(f"{where}: {key}={d[key]}: shared experts are not supported")
    if float(d.get("router_jitter_noise") or 0.0) > 0:
        raise UnsupportedConfigError(f"{where}: router_jitter_noise={d['router_jitter_noise']} is not supported "
                                     "(random routing noise in training; set it to 0)")
    layers = int(_require(d, "num_hidden_layers", where))
    if model_type == "mixtral":
        ffn_key, norm_topk, pattern = "intermediate_size", True, [1] * layers
    else:
        ffn_key = "moe_intermediate_size"
        norm_topk = bool(d.get("norm_topk_prob", False))
        step = int(d.get("decoder_sparse_step") or 1)
        dense = set(d.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    # transformers 5 writes num_local_experts for both families; 4.x wrote num_experts for qwen3_moe.
    experts_key = "num_local_experts" if d.get("num_local_experts") is not None else "num_experts"
    num_experts, top_k = int(_require(d, experts_key, where)), int(_require(d, "num_experts_per_tok", where))
    if not 0 < top_k <= num_experts:
        raise UnsupportedConfigError(f"{where}: num_experts_per_tok={top_k} must be in 1..{experts_key}={num_experts}")
    if top_k == 1 and norm_topk:
        # The renormalised top-1 weight is always 1; Megatron refuses top-1 without pre-softmax routing.
        raise UnsupportedConfigError(f"{where}: num_experts_per_tok=1 with renormalised top-k weights "
                                     "(norm_topk_prob / Mixtral) is not supported")
    if not any(pattern):
        raise UnsupportedConfigError(f"{where}: no layer is a mixture-of-experts layer (mlp_only_layers / "
                                     "decoder_sparse_step); convert it as a dense model")
    return MoESpec(num_experts=num_experts, top_k=top_k, ffn_hidden_size=int(_require(d, ffn_key, where)),
                   norm_topk_prob=norm_topk, layer_pattern=tuple(pattern),
                   aux_loss_coef=float(d.get("router_aux_loss_coef") or 0.0))


def parse_hf_config(cfg: Any, where: str = "config.json") -> HFArch:
    """Validate an HF config (dict or transformers object) and return its HFArch; `where` names it in errors."""
    d = _as_dict(cfg)
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"{where}: model_type {model_type!r} (architectures={d.get('architectures')}) is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_unsupported_fields(d, model_type, where)
    _check_sliding_window(d, model_type, where)
    hidden = int(_require(d, "hidden_size", where))
    heads = int(_require(d, "num_attention_heads", where))
    kv_heads = int(d.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UnsupportedConfigError(f"{where}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    head_dim = int(d.get("head_dim") or hidden // heads)
    moe = _parse_moe(d, model_type, where)
    return HFArch(
        model_type=model_type,
        num_layers=int(_require(d, "num_hidden_layers", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(d, "intermediate_size", where)),  # dense layers' MLP (MoE: unused if all sparse)
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_require(d, "vocab_size", where)),
        max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        rope=_parse_rope(d, where),
        moe=moe,
    )


def load_hf_arch(config_path: Path) -> HFArch:
    """Read config.json from a file (or a model directory) and parse it, naming the file in every error."""
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON: {e}") from e
    return parse_hf_config(d, where=str(path))

