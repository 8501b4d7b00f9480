"""Tiny random Hugging Face decoders of every supported family, for conversion and model-build tests.

hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 200 (not a multiple of 128, so padding is exercised).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=200,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_configs() -> Dict[str, object]:
    """family name -> transformers config; names say which feature each one covers."""
    return {
        "llama3_scaled_untied": LlamaConfig(
            **COMMON, tie_word_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32},
        ),
        "llama2_tied": LlamaConfig(**COMMON, tie_word_embeddings=True),
        "qwen2_bias_tied": Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1000000.0),
        # Qwen3: head_dim 32 != hidden / heads = 16 (kv_channels path), q/k norms.
        "qwen3_headdim_untied": Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
        "mistral_untied": MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False),
    }


def tiny_moe_configs() -> Dict[str, object]:
    """Mixture-of-experts families: 4 experts, top-2.

    Qwen3-MoE: unnormalised top-k probabilities (norm_topk_prob false: Megatron's pre-softmax routing), layer 1
    dense (mlp_only_layers), q/k norms, untied. Mixtral: renormalised top-k, every layer MoE, tied.
    """
    moe = dict(COMMON, num_experts_per_tok=2)
    return {
        "qwen3_moe_mixed_untied": Qwen3MoeConfig(**moe, num_experts=4, moe_intermediate_size=48, norm_topk_prob=False,
                                                 mlp_only_layers=[1], tie_word_embeddings=False),
        "mixtral_tied": MixtralConfig(**dict(moe, intermediate_size=48), num_local_experts=4, sliding_window=None,
                                      tie_word_embeddings=True),
    }


def make_tiny_model(config, seed: int = 0) -> torch.nn.Module:
    """Random float32 model; norms and biases randomised too so every tensor's mapping is tested."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save_tiny(name: str, config, out: Path, seed: int = 0) -> Path:
    model = make_tiny_model(config, seed)
    model.save_pretrained(out / name)
    return out / name


def convert_tiny(configs: Dict[str, object], base: Path, seed: int = 0) -> Dict[str, str]:
    """Each config as a random tiny HF model in base/NAME, converted to Megatron (float32) in base/NAME_mcore."""
    from megatron_gift.cli.convert_hf_to_mcore import convert

    out = {}
    for name, cfg in configs.items():
        make_tiny_model(cfg, seed=seed).save_pretrained(base / name)
        convert(base / name, base / f"{name}_mcore", dtype="float32", quiet=True)
        out[name] = str(base / f"{name}_mcore")
    return out
