"""Mixture-of-experts configs and names (Qwen3-MoE, Mixtral): parsing, refusals naming the key, and the
HF <-> Megatron table round trip in both spec spellings, with plain tensors (no Megatron import)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megatron_gift.hf.arch import UnsupportedConfigError, parse_hf_config
from megatron_gift.hf.mapping import hf_to_mcore_tensors, mcore_to_hf_tensors, unexpected_hf_names
from tests.tiny_hf import make_tiny_model, tiny_moe_configs

CONFIGS = tiny_moe_configs()


@pytest.fixture(scope="module")
def disk_state(tmp_path_factory):
    """family -> HF tensors as saved on disk (per-expert names; transformers 5 fuses them in memory)."""
    base = tmp_path_factory.mktemp("moe_sd")
    out = {}
    for name, cfg in CONFIGS.items():
        make_tiny_model(cfg).save_pretrained(base / name)
        out[name] = load_file(str(base / name / "model.safetensors"))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("te_spec", [False, True])
def test_moe_roundtrip_is_identity_and_covers_every_tensor(disk_state, name, te_spec):
    cfg, sd = CONFIGS[name], disk_state[name]
    arch = parse_hf_config(cfg)
    assert unexpected_hf_names(arch, sd) == [] and ("lm_head.weight" in sd) != arch.tie_embeddings
    mcore = dict(hf_to_mcore_tensors(arch, sd.__getitem__, te_spec=te_spec))
    fc1 = "decoder.layers.0.mlp.experts." + ("linear_fc1.weight3" if te_spec else "local_experts.3.linear_fc1.weight")
    block = "block_sparse_moe" if arch.model_type == "mixtral" else "mlp"
    gate, up = ("w1", "w3") if arch.model_type == "mixtral" else ("gate_proj", "up_proj")
    assert torch.equal(mcore[fc1], torch.cat([sd[f"model.layers.0.{block}.experts.3.{gate}.weight"],
                                              sd[f"model.layers.0.{block}.experts.3.{up}.weight"]]))
    assert torch.equal(mcore["decoder.layers.0.mlp.router.weight"], sd[f"model.layers.0.{block}.gate.weight"])
    back = dict(mcore_to_hf_tensors(None, mcore.items(), arch=arch))
    expected = {k for k in sd if not (arch.tie_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    for k in expected:
        assert torch.equal(back[k], sd[k]), k


def test_moe_fields_are_read():
    q = parse_hf_config(CONFIGS["qwen3_moe_mixed_untied"]).moe
    assert (q.num_experts, q.top_k, q.ffn_hidden_size, q.norm_topk_prob, q.layer_pattern) == (4, 2, 48, False, (1, 0))
    m = parse_hf_config(CONFIGS["mixtral_tied"]).moe
    assert (m.num_experts, m.top_k, m.ffn_hidden_size, m.norm_topk_prob, m.layer_pattern) == (4, 2, 48, True, (1, 1))
    d = CONFIGS["qwen3_moe_mixed_untied"].to_dict()
    d.update(num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2, router_aux_loss_coef=0.02)
    step = parse_hf_config(d).moe
    assert step.layer_pattern == (0, 1, 0, 1) and step.aux_loss_coef == 0.02


def _moe(**kw):
    d = CONFIGS["qwen3_moe_mixed_untied"].to_dict()
    d.update(kw)
    return d


@pytest.mark.parametrize("cfg, pattern", [
    (_moe(shared_expert_intermediate_size=64), "shared_expert_intermediate_size=64: shared experts"),
    ({**CONFIGS["mixtral_tied"].to_dict(), "router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    (_moe(num_experts_per_tok=5), "num_experts_per_tok=5"),
    (_moe(num_experts_per_tok=1, norm_topk_prob=True), "num_experts_per_tok=1 with renormalised"),
    (_moe(mlp_only_layers=[0, 1]), "no layer is a mixture-of-experts layer"),
    ({**CONFIGS["qwen3_moe_mixed_untied"].to_dict(), "model_type": "qwen3"}, "num_experts > 0 in a qwen3 config"),
])
def test_unsupported_moe_configs_name_the_key(cfg, pattern):
    with pytest.raises(UnsupportedConfigError, match=pattern):
        parse_hf_config(cfg)
