"""The MoE router load-balancing loss (`model.moe_load_balancing: aux_loss`, mcore/moe_aux.py) under the GIFT
schedule: its gradient and logged value equal an independent reference built on the transformers model, and
EP=2, PP=2 and TP=2 x EP=2 (sequence parallel) equal the one-process run.

Reference (float32, in this process): the HF model's router inputs are captured with hooks on its gates; per
microbatch and MoE layer the Switch loss E * sum_i f_i P_i over the valid (non-padding) tokens (f_i: fraction of
top-k slots routed to expert i, P_i: mean router probability) is summed into
coeff * sum_mb (n_mb / N_tok) * sum_layers L, and autograd gives its gradient for every HF parameter. The
Megatron side is grad(aux on) - grad(aux off) from `GiftSchedule.forward_backward`; padded microbatches of
unequal length make the token weights and the padding mask matter.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.distributed.test_moe_gradients import ATOL, RTOL, _merged
from tests.distributed.test_moe_gradients import _grads as _moe_grads
from tests.tiny_hf import convert_tiny, tiny_moe_configs

pytestmark = pytest.mark.distributed
COEFF = 4.0  # large, so the aux gradient is comparable to the policy gradient
AUX = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": COEFF}
MAX_TOKENS = 64  # token-budget microbatches: several, of different lengths


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_aux")
    return base, convert_tiny(tiny_moe_configs(), base, seed=3)


def _microbatches(groups, pipeline: bool):
    from megatron_gift.algo.packing import pack_microbatches
    if pipeline:  # pipeline stages exchange one shape: equal counts, one length
        return pack_microbatches(groups, num_microbatches=2, uniform_length=True)
    return pack_microbatches(groups, max_tokens=MAX_TOKENS)


def _grads(rank, world_size, mcore_dirs, groups, overrides, loss_name, pipeline, dp_split=1):
    """test_moe_gradients' worker with this file's microbatching."""
    return _moe_grads(rank, world_size, mcore_dirs, groups, overrides, loss_name=loss_name,
                      make_mbs=partial(_microbatches, pipeline=pipeline), dp_split=dp_split)


def _switch_loss(logits, valid, top_k):
    """Megatron's Switch loss of one layer and microbatch (without the coefficient), valid tokens only."""
    scores = torch.softmax(logits.float(), dim=-1) * valid[:, None]
    routed = torch.zeros_like(scores).scatter(1, torch.topk(scores, top_k, dim=-1).indices, 1.0) * valid[:, None]
    n, experts = valid.sum(), logits.shape[-1]
    return experts * (routed.sum(0) / (n * top_k) * scores.sum(0) / n).sum()


def _hf_reference(hf_dir, microbatches, token_weighted=True):
    """(aux objective gradient by HF parameter name, mean Switch loss over microbatches and MoE layers);
    token_weighted=False weights every microbatch equally (the mutation the test must tell apart)."""
    from transformers import AutoModelForCausalLM

    from megatron_gift.algo.packing import padding_mask
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    gates = [m for n, m in model.named_modules() if n.endswith(".mlp.gate")]
    hidden = model.config.hidden_size
    inputs = []
    hooks = [g.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0].reshape(-1, hidden))))
             for g in gates]
    top_k = model.config.num_experts_per_tok
    valid = [(~padding_mask(mb)).reshape(-1).float() for mb in microbatches]
    n_tok = sum(v.sum() for v in valid)
    total, logged = 0.0, []
    for mb, v in zip(microbatches, valid):
        inputs.clear()
        model(mb.tokens)
        layer_losses = [_switch_loss(torch.nn.functional.linear(x, g.weight), v, top_k) for g, x in inputs]
        weight = v.sum() / n_tok if token_weighted else 1.0 / len(microbatches)
        total = total + COEFF * weight * sum(layer_losses)
        logged.append(float(sum(layer_losses)) / len(layer_losses))
    for h in hooks:
        h.remove()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    return ({n: g for n, g in zip(params, grads) if g is not None}, sum(logged) / len(logged), len(gates))


@pytest.fixture(scope="module")
def one_process(dirs):
    _, mcore_dirs = dirs
    groups = make_groups(n_groups=4, size=3, seed=7)
    runs = {}
    for loss_name in ("gift", "grpo"):
        for key, overrides in (("off", {}), ("on", AUX)):
            runs[loss_name, key] = run_distributed(_grads, 1, mcore_dirs=mcore_dirs, groups=groups,
                                                   overrides=overrides, loss_name=loss_name, pipeline=False)[0]
    runs["pipeline"] = run_distributed(_grads, 1, mcore_dirs=mcore_dirs, groups=groups, overrides=AUX,
                                       loss_name="gift", pipeline=True)
    runs["dp2"] = run_distributed(_grads, 1, mcore_dirs=mcore_dirs, groups=groups, overrides=AUX,
                                  loss_name="gift", pipeline=False, dp_split=2)
    return groups, runs


@pytest.mark.parametrize("loss_name", ["gift", "grpo"])
def test_aux_loss_gradient_and_value_equal_hf_reference(dirs, one_process, loss_name):
    base, mcore_dirs = dirs
    groups, runs = one_process
    mbs = _microbatches(groups, pipeline=False)
    assert len({mb.tokens.shape for mb in mbs}) > 1  # unequal microbatches: the token weights matter
    for name in mcore_dirs:
        on, off = runs[loss_name, "on"][name], runs[loss_name, "off"][name]
        assert off["aux"] is None and on["coeff"] == COEFF  # the configured coefficient is back after the pass
        ref, ref_value, n_gates = _hf_reference(base / name, mbs)
        # Mixtral checkpoints name the router block_sparse_moe.gate; the loaded transformers model, mlp.gate
        got = {k.replace(".block_sparse_moe.", ".mlp."): on["grads"][k] - off["grads"][k] for k in on["grads"]}
        common = [k for k in ref if k in got]
        assert sum(".mlp.gate.weight" in k for k in common) == n_gates and any("q_proj" in k for k in common)
        scale = max(float(ref[k].abs().max()) for k in common)
        worst = max(float((got[k] - ref[k]).abs().max()) for k in common)
        policy = max(float(g.abs().max()) for g in off["grads"].values())
        print(f"{loss_name} {name}: aux grad max {scale:.3e} (policy grad max {policy:.3e}), max |diff| vs HF "
              f"{worst:.2e}; logged Switch loss {on['aux']:.6f} vs HF {ref_value:.6f}")
        assert scale > 0.05 * policy  # the aux gradient is not negligible next to the policy gradient
        for k in common:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5 * max(1.0, scale), rtol=1e-3,
                                       msg=lambda m, k=k: f"{loss_name} {name} {k}: {m}")
        assert on["aux"] == pytest.approx(ref_value, rel=1e-5)
        equal, _, _ = _hf_reference(base / name, mbs, token_weighted=False)  # microbatches weighted equally
        assert max(float((got[k] - equal[k]).abs().max()) for k in common) > 100 * 1e-5 * max(1.0, scale)


# ep2: the two data-parallel ranks' token-budget microbatches differ in length (alltoall dispatch, mcore/model.py)
LAYOUTS = {"ep2": (2, 1, 1, 2, {}), "pp2": (2, 1, 2, 1, {}), "tp2xep2_sp": (2, 2, 1, 2, {"sequence_parallel": True})}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_aux_loss_layouts_equal_one_process(dirs, one_process, layout):
    _, mcore_dirs = dirs
    groups, runs = one_process
    world, tp, pp, ep, overrides = LAYOUTS[layout]
    pipeline = pp > 1
    results = run_distributed(_grads, world, tp=tp, pp=pp, ep=ep, mcore_dirs=mcore_dirs, groups=groups,
                              overrides={**AUX, **overrides}, loss_name="gift", pipeline=pipeline, timeout=400)
    dp = world // (tp * pp)
    one = runs["pipeline"] if pipeline else runs["dp2"] if dp == 2 else [runs["gift", "on"]]
    for name in mcore_dirs:
        ref, got = _merged(one, name), _merged(results, name)
        diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        print(f"{layout} {name}: max |grad diff| {diff:.2e}; Switch loss {results[0][name]['aux']:.6f} vs "
              f"{one[0][name]['aux']:.6f}")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{layout} {name} {k}: {m}")
        for res in results:
            assert res[name]["aux"] == pytest.approx(one[0][name]["aux"], rel=1e-5)
