"""HF <-> Megatron name table and transforms, with plain tensors (no Megatron import)."""
from __future__ import annotations

import pytest
import torch

from megatron_gift.hf.arch import UnsupportedConfigError, parse_hf_config
from megatron_gift.hf.mapping import (
    fuse_qkv,
    hf_to_mcore_tensors,
    mapping_entries,
    mcore_to_hf_tensors,
    split_qkv,
    unexpected_hf_names,
)
from tests.tiny_hf import COMMON, make_tiny_model, tiny_configs

CONFIGS = tiny_configs()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("te_spec", [False, True])
def test_roundtrip_is_identity_and_covers_every_tensor(name, te_spec):
    cfg = CONFIGS[name]
    sd = make_tiny_model(cfg).state_dict()
    arch = parse_hf_config(cfg)
    assert unexpected_hf_names(arch, sd) == ([] if not arch.tie_embeddings else ["lm_head.weight"])
    mcore = dict(hf_to_mcore_tensors(arch, sd.__getitem__, te_spec=te_spec))
    assert mcore["embedding.word_embeddings.weight"].shape == (256, 64)
    assert torch.all(mcore["embedding.word_embeddings.weight"][200:] == 0)
    assert ("output_layer.weight" in mcore) != arch.tie_embeddings
    back = dict(mcore_to_hf_tensors(cfg.to_dict(), mcore.items()))
    expected = {k for k in sd if not (arch.tie_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    for k in expected:
        assert torch.equal(back[k], sd[k]), k


def test_qkv_layout_is_grouped_per_query_group():
    arch = parse_hf_config(tiny_configs()["qwen3_headdim_untied"])  # 4 heads, 2 groups, d=32
    d, h = arch.head_dim, arch.hidden_size
    q = torch.arange(4).repeat_interleave(d)[:, None].float().expand(-1, h)  # row value = q head index
    k = 10 + torch.arange(2).repeat_interleave(d)[:, None].float().expand(-1, h)
    v = 20 + torch.arange(2).repeat_interleave(d)[:, None].float().expand(-1, h)
    fused = fuse_qkv(arch, q, k, v)
    heads = fused[::d, 0].tolist()  # one value per d-row block
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(arch, fused), (q, k, v)))
    bias = fuse_qkv(arch, q[:, 0], k[:, 0], v[:, 0])
    assert torch.equal(bias, fused[:, 0])


def test_export_accepts_te_names_local_layer_numbers_and_skips_tied_head():
    cfg = tiny_configs()["llama2_tied"]
    sd = make_tiny_model(cfg).state_dict()
    arch = parse_hf_config(cfg)
    mcore = dict(hf_to_mcore_tensors(arch, sd.__getitem__, te_spec=True))
    # Last pipeline stage of PP=2: holds layer 1 as local layer 0, plus a tied copy of the embedding.
    stage = [(n.replace("decoder.layers.1.", "decoder.layers.0."), t) for n, t in mcore.items()
             if n.startswith("decoder.layers.1.")]
    stage.append(("output_layer.weight", mcore["embedding.word_embeddings.weight"]))
    out = dict(mcore_to_hf_tensors(cfg.to_dict(), stage, layer_offset=1))
    assert set(out) == {k for k in sd if k.startswith("model.layers.1.")}
    assert all(torch.equal(out[k], sd[k]) for k in out)


def test_shape_mismatch_names_the_tensor():
    cfg = tiny_configs()["mistral_untied"]
    sd = dict(make_tiny_model(cfg).state_dict())
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(16, 64\)"):
        list(hf_to_mcore_tensors(parse_hf_config(cfg), sd.__getitem__))


def test_unknown_megatron_name_is_an_error():
    cfg = tiny_configs()["mistral_untied"].to_dict()
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.router.weight"):
        list(mcore_to_hf_tensors(cfg, [("decoder.layers.0.mlp.router.weight", torch.zeros(2))]))


def test_other_model_tensors_are_reported():
    arch = parse_hf_config(tiny_configs()["llama2_tied"])
    assert unexpected_hf_names(arch, ["model.layers.0.self_attn.rotary_emb.inv_freq", "transformer.h.0.attn.c_attn.weight"]) == [
        "transformer.h.0.attn.c_attn.weight"
    ]
    assert len(mapping_entries(arch)) == 1 + 2 * 6 + 1


def _cfg(**kw):
    return {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": 200, **kw}


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        (_cfg(model_type="gpt2"), r"'gpt2'.*supported: llama, mistral, qwen2, qwen3"),
        (_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"'yarn' is not supported.*llama3"),
        (_cfg(model_type="mistral", sliding_window=64, max_position_embeddings=256), "sliding_window=64"),
        (_cfg(model_type="qwen2", use_sliding_window=True), "sliding-window attention is in use"),
        (_cfg(attention_bias=True), "attention_bias"),
        (_cfg(hidden_act="gelu"), "hidden_act='gelu'"),
        (_cfg(num_key_value_heads=3), "not divisible"),
        (_cfg(vocab_size=None), "vocab_size"),
    ],
)
def test_unsupported_configs_name_the_field(cfg, pattern):
    with pytest.raises(UnsupportedConfigError, match=pattern):
        parse_hf_config(cfg)


def test_transformers4_and_5_rope_layouts_agree():
    v4 = _cfg(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    v5 = _cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert parse_hf_config(v4).rope == parse_hf_config(v5).rope
    assert parse_hf_config(v4).rope.theta == 5e5
    # Mistral with a window no shorter than the context never slides: accepted.
    assert parse_hf_config(_cfg(model_type="mistral", sliding_window=4096, max_position_embeddings=4096))
    assert COMMON["vocab_size"] % 128  # padding exercised


def test_export_shape_mismatch_names_the_megatron_tensor():
    cfg = tiny_configs()["qwen3_headdim_untied"].to_dict()  # expects linear_qkv rows (4 + 2*2) * 32 = 256
    bad = [("decoder.layers.0.self_attention.linear_qkv.weight", torch.zeros(128, 64))]
    with pytest.raises(ValueError, match=r"linear_qkv.weight.*\(128, 64\).*\(256, 64\)"):
        list(mcore_to_hf_tensors(cfg, bad))
    with pytest.raises(ValueError, match=r"embedding.word_embeddings.weight.*\(199, 64\)"):
        list(mcore_to_hf_tensors(cfg, [("embedding.word_embeddings.weight", torch.zeros(199, 64))]))
