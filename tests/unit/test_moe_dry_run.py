"""Dry run of a mixture-of-experts recipe (Qwen3-30B-A3B): parameter counts by hand from the public shape
(48 layers, h 2048, 32/4 heads of 128, 128 experts of ffn 768, top-8, vocab 151936, untied), experts sharded by
EP in weights and in the distributed optimizer's expert data-parallel group, and layout errors naming keys."""
import re
from pathlib import Path

import pytest

from megatron_gift.cli.dry_run import parse_args, run
from megatron_gift.config.run import load_run_config
from megatron_gift.hf.arch import load_hf_arch
from megatron_gift.planning.layout import check_layout
from megatron_gift.planning.memory import GIB, estimate_stage
from megatron_gift.planning.model_size import active_ffn_width, total_params

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples/qwen3_30b_a3b_gift.yaml"
L, H, E, F, V = 48, 2048, 128, 768, 151936
ATTN = H * (32 * 128 + 2 * 4 * 128) + 32 * 128 * H  # q, k, v, o
NORMS = 2 * H + 2 * 128


def _layout(nodes, overrides=()):
    cfg = load_run_config(RECIPE, list(overrides))
    path = str(Path(cfg.model.hf_dir) / "config.json")
    return check_layout(cfg, load_hf_arch(Path(path)), path, nodes, 8, recompute=cfg.parallel.recompute)


def test_recipe_is_the_released_gift_setting_and_counts_match_the_public_model():
    cfg = load_run_config(RECIPE)
    assert (cfg.loss.options, cfg.optim.lr, cfg.trainer.prompts_per_step, cfg.trainer.updates_per_rollout,
            cfg.trainer.responses_per_prompt) == ({"beta": 1.0, "grad_mode": "detached", "anchor": "old"}, 3e-6,
                                                  1024, 4, 16)
    assert (cfg.data.max_prompt_tokens, cfg.rollout.sampling.max_new_tokens) == (2048, 4096)
    arch = load_hf_arch(ROOT / "examples/arch/qwen3_30b_a3b")
    by_hand = L * (ATTN + NORMS + E * 3 * H * F + E * H) + H + 2 * V * H
    assert total_params(arch, 128) == by_hand and 30.4e9 < by_hand < 30.6e9  # "30.5B"
    assert active_ffn_width(arch) == 8 * F


def test_recipe_fits_on_8x8_h100_with_experts_sharded_by_ep():
    rep = _layout(8)
    assert not rep.errors, rep.errors
    plan = rep.plan
    est = estimate_stage(plan, 0)
    experts = L * (E // 8) * 3 * H * F  # 16 experts per rank, not split over TP (ETP=1)
    dense = L * (ATTN // 4 + NORMS + E * H) + H + 2 * (V // 4) * H
    assert est.get("weights") == 2 * (experts + dense)
    assert est.get("optimizer state") == pytest.approx(12 * (dense / 16 + experts / 8))  # DPxCP=16, expert-DP=8
    assert est.total / GIB < 80 - 24 - 4  # vLLM share 0.3 x 80 GiB and the reserve on top
    ep16 = estimate_stage(_layout(8, ["parallel.ep=16"]).plan, 0)
    assert ep16.get("weights") == pytest.approx(2 * (experts / 2 + dense))


@pytest.mark.parametrize("overrides, pattern", [
    (["parallel.ep=3"], r"parallel.ep=3 does not divide the model's 128 experts"),
    (["parallel.ep=128", "parallel.cp=1", "trainer.microbatches=16"], r"parallel.ep \* parallel.etp = 128\*1 must divide"),
    (["parallel.ep=1", "parallel.etp=8"], r"parallel.etp=8 > parallel.tp=\d needs parallel.ep > 1"),
])
def test_bad_moe_layouts_name_the_key(overrides, pattern):
    rep = _layout(8, overrides)
    assert any(re.search(pattern, e) for e in rep.errors), rep.errors


def test_bad_moe_model_keys_are_refused_on_load():
    with pytest.raises(ValueError, match=r"model.moe_load_balancing is 'z_loss'; valid: none, aux_loss$"):
        load_run_config(RECIPE, ["model.moe_load_balancing=z_loss"])
    with pytest.raises(ValueError, match=r"model.moe_load_balancing is 'seq_aux_loss'; valid: none, aux_loss \(Megatron"):
        load_run_config(RECIPE, ["model.moe_load_balancing=seq_aux_loss"])
    with pytest.raises(ValueError, match=r"model.moe_aux_loss_coeff is -0.1; it must be >= 0"):
        load_run_config(RECIPE, ["model.moe_aux_loss_coeff=-0.1"])
    with pytest.raises(ValueError, match=r"model.moe_router_dtype is 'bf16'"):
        load_run_config(RECIPE, ["model.moe_router_dtype=bf16"])


@pytest.mark.parametrize("overrides, pattern", [
    (["model.moe_aux_loss_coeff=0"], r"model.moe_load_balancing: aux_loss with a coefficient of 0"),
    (["parallel.cp=2"], r"model.moe_load_balancing: aux_loss with parallel.cp=2 is not supported"),
    (["parallel.recompute=full"], r"model.moe_load_balancing: aux_loss with parallel.recompute: full"),
    (["parallel.ep=1", "parallel.sequence_parallel=false"], r"aux_loss with parallel.tp=\d needs parallel.sequence_"),
])
def test_aux_loss_layouts_it_cannot_weight_are_refused(overrides, pattern):
    # the recipe's layout without CP and full recompute, with the HF config's router_aux_loss_coef (0.001): accepted
    aux = ["model.moe_load_balancing=aux_loss", "parallel.cp=1", "parallel.recompute=selective", "trainer.microbatches=16"]
    ok = _layout(8, aux)
    assert not ok.errors, ok.errors
    rep = _layout(8, aux + overrides)
    assert any(re.search(pattern, e) for e in rep.errors), rep.errors


def test_aux_loss_coefficient_and_type_reach_megatron():
    from megatron_gift.config.moe import moe_overrides
    arch = load_hf_arch(ROOT / "examples/arch/qwen3_30b_a3b")
    assert arch.moe.aux_loss_coef == 0.001
    off = moe_overrides(arch, load_run_config(RECIPE).model)
    assert (off["moe_router_load_balancing_type"], off["moe_aux_loss_coeff"]) == ("none", 0.0)
    on = moe_overrides(arch, load_run_config(RECIPE, ["model.moe_load_balancing=aux_loss"]).model)
    assert (on["moe_router_load_balancing_type"], on["moe_aux_loss_coeff"]) == ("aux_loss", 0.001)
    mine = moe_overrides(arch, load_run_config(RECIPE, ["model.moe_load_balancing=aux_loss",
                                                        "model.moe_aux_loss_coeff=0.02"]).model)
    assert mine["moe_aux_loss_coeff"] == 0.02


def test_expert_settings_on_a_dense_model_are_refused():
    lines = []
    code = run(parse_args([str(ROOT / "examples/llama3_8b_gift.yaml"), "--nodes", "1", "--gpus-per-node", "8",
                           "--set", "parallel.ep=2"]), out=lines.append)
    assert code != 0 and "parallel.ep: set for a dense model (llama)" in "\n".join(lines)
    lines = []
    code = run(parse_args([str(ROOT / "examples/llama3_8b_gift.yaml"), "--nodes", "1", "--gpus-per-node", "8",
                           "--set", "model.moe_load_balancing=aux_loss"]), out=lines.append)
    assert code != 0 and "model.moe_load_balancing: set for a dense model (llama)" in "\n".join(lines)
