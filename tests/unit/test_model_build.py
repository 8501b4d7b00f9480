"""GPTModel built from HF configs computes transformers' logits (TP=1, one process), and its config is right."""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_gift.hf.arch import parse_hf_config
from megatron_gift.mcore.convert import copy_hf_into_model, single_process_parallel_state
from megatron_gift.mcore.model import build_gpt_model, te_available, transformer_config_from_hf
from tests.convert_checks import full_logits, tokens
from tests.tiny_hf import make_tiny_model, tiny_configs

CONFIGS = tiny_configs()


@pytest.fixture(scope="module")
def parallel_state_1():
    with single_process_parallel_state():
        yield


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_fp32(parallel_state_1, name):
    cfg = CONFIGS[name]
    hf = make_tiny_model(cfg)
    arch = parse_hf_config(cfg)
    model = build_gpt_model(cfg, dtype=torch.float32).eval()
    copy_hf_into_model(model, arch, hf.state_dict().__getitem__)
    ids = tokens(arch.vocab_size, s=48)  # 48 > original_max_position_embeddings=32 of the llama3 config
    with torch.no_grad():
        ref = hf(ids).logits
    out = full_logits(model, ids, arch.hidden_size)
    assert out.shape == (2, 48, 256)
    diff = (out[..., : arch.vocab_size] - ref).abs().max().item()
    print(f"{name}: TP=1 max |logit diff| = {diff:.3e} (logit scale {ref.abs().max().item():.2f})")
    assert diff < 1e-4


def test_llama3_inverse_frequencies_match_transformers(parallel_state_1):
    cfg = CONFIGS["llama3_scaled_untied"]
    model = build_gpt_model(cfg, perform_initialization=False)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.cpu(), ref, rtol=1e-6, atol=0)
    # megatron-core's own defaults (original_max_position_embeddings=8192) would differ for this config:
    default = model.rotary_pos_emb._apply_scaling(
        1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)), factor=8.0)
    assert not torch.allclose(default, ref)


def test_transformer_config_fields():
    qwen3 = transformer_config_from_hf(CONFIGS["qwen3_headdim_untied"], dtype="bfloat16", tp=2)
    assert (qwen3.kv_channels, qwen3.num_query_groups, qwen3.qk_layernorm, qwen3.add_qkv_bias) == (32, 2, True, False)
    assert qwen3.params_dtype == torch.bfloat16 and qwen3.bf16 and qwen3.tensor_model_parallel_size == 2
    assert qwen3.normalization == "RMSNorm" and qwen3.gated_linear_unit and not qwen3.add_bias_linear
    assert not (qwen3.apply_rope_fusion or qwen3.gradient_accumulation_fusion or qwen3.persist_layer_norm)
    qwen2 = transformer_config_from_hf(CONFIGS["qwen2_bias_tied"])
    assert qwen2.add_qkv_bias and qwen2.kv_channels == 16 and qwen2.layernorm_epsilon == 1e-5
    assert qwen2.use_cpu_initialization == (not torch.cuda.is_available())
    with pytest.raises(ValueError, match="seq_length_typo"):
        transformer_config_from_hf(CONFIGS["qwen2_bias_tied"], seq_length_typo=1)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        transformer_config_from_hf(CONFIGS["qwen2_bias_tied"], dtype="fp8")


def test_tied_and_padded_model(parallel_state_1):
    tied = build_gpt_model(CONFIGS["llama2_tied"], perform_initialization=False)
    assert tied.share_embeddings_and_output_weights and tied.output_layer.weight is None
    assert tied.embedding.word_embeddings.weight.shape == (256, 64)
    untied = build_gpt_model(CONFIGS["mistral_untied"], vocab_multiple=64, perform_initialization=False)
    assert untied.output_layer.weight.shape == (256, 64) and untied.vocab_size == 256
    assert not te_available() or torch.cuda.is_available()


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_recompute_gives_the_same_gradients(parallel_state_1, mode):
    """Recomputed activations (parallel.recompute) change memory, not numbers: logits and every gradient
    equal the plain model's; an unknown mode is an error naming the key."""
    from megatron_gift.mcore.cpu_compat import enable_cpu_compat
    from megatron_gift.mcore.model import recompute_kwargs

    with enable_cpu_compat():  # the recompute path uses Megatron's CUDA RNG tracker and a "cuda" mask
        grads = _grads_with_and_without(recompute_kwargs(mode))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="parallel.recompute is 'some'"):
        recompute_kwargs("some")


def _grads_with_and_without(recompute: dict) -> list:
    cfg = CONFIGS["llama3_scaled_untied"]
    hf = make_tiny_model(cfg)
    arch = parse_hf_config(cfg)
    ids = tokens(arch.vocab_size, s=24)
    grads = []
    for kwargs in ({}, recompute):
        model = build_gpt_model(cfg, dtype=torch.float32, **kwargs)
        assert model.config.recompute_granularity == kwargs.get("recompute_granularity")
        copy_hf_into_model(model, arch, hf.state_dict().__getitem__)
        model.train()  # recompute only acts in training mode
        logits = model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), None)
        logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return grads
