"""GRPO / DAPO as verl runs them: every aggregation mode, dual clip, log-ratio clamp and KL estimator
against an independent float64 per-token loop (tests/unit/policy_reference.py); split invariance of the
global division; the registry."""

import pytest
import torch

from megatron_gift.algo import DAPOConfig, DAPOLoss, GRPOConfig, GRPOLoss, build_loss, loss_names
from megatron_gift.algo.gift import GIFTLoss
from tests.unit.loss_batches import make_batch, select_groups
from tests.unit.policy_reference import reference_grpo

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
SIZES = [4, 3, 1, 2]  # a group of one included


def hard_batch(seed, sizes=SIZES):
    """Log-ratios spread over [-1.5, 1.5] (clipping and dual clipping both hit), two beyond the +-20 clamp,
    masked first tokens (make_batch), one empty response, reference log-probs for the KL terms."""
    logprobs, inputs = make_batch(sizes, seq_len=7, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs.anchor_logprobs = logprobs.detach() + 3.0 * (torch.rand(logprobs.shape, generator=gen, dtype=torch.float64) - 0.5)
    inputs.anchor_logprobs[0, 3] = float(logprobs.detach()[0, 3]) - 25.0  # clamped at +20
    inputs.anchor_logprobs[5, 4] = float(logprobs.detach()[5, 4]) + 30.0  # clamped at -20
    inputs.mask[0, :3] = 0.0
    inputs.mask[0, 3:5] = 1.0
    inputs.mask[5, 4] = 1.0
    inputs.mask[2] = 0.0  # an empty response
    inputs.ref_logprobs = logprobs.detach() + 0.8 * torch.randn(logprobs.shape, generator=gen, dtype=torch.float64)
    inputs.ref_logprobs[1, 2] = float(logprobs.detach()[1, 2]) + 40.0  # k3's clamps
    return logprobs, inputs


def ours_and_grad(loss, logprobs, inputs):
    out = loss(logprobs, inputs)
    value = out.loss_sum / out.num_sequences
    (grad,) = torch.autograd.grad(value, logprobs)
    return value, grad, out


def ref_and_grad(logprobs, inputs, **kw):
    value = reference_grpo(logprobs, inputs, SIZES, **kw)
    (grad,) = torch.autograd.grad(value, logprobs)
    return value, grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kl", [(0.0, "k3"), (0.1, "k1"), (0.1, "k2"), (0.1, "k3")])
def test_matches_reference_loop_and_its_gradient(mode, kl):
    kl_coef, estimator = kl
    logprobs, inputs = hard_batch(31)
    cfg = GRPOConfig(loss_agg_mode=mode, kl_coef=kl_coef, kl_estimator=estimator, clip_high=0.28)
    ours, grad, out = ours_and_grad(GRPOLoss(cfg), logprobs, inputs)
    ref, ref_grad = ref_and_grad(logprobs, inputs, mode=mode, kl_coef=kl_coef, estimator=estimator, clip_high=0.28)
    assert abs(float(ours) - float(ref)) <= 1e-12 * max(1.0, abs(float(ref)))
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    m = out.metrics
    assert 0 < float(m["clip_frac"][0]) < float(m["clip_frac"][1])
    assert float(m["clip_frac_lower"][0]) > 0  # the dual clip binds somewhere in this batch


def test_token_mean_counts_tokens_and_seq_modes_count_sequences():
    logprobs, inputs = hard_batch(32)
    tokens = float(inputs.mask.sum())
    for mode, count in [("token-mean", tokens), ("seq-mean-token-mean", 10.0), ("seq-mean-token-sum", 10.0)]:
        assert float(GRPOLoss(GRPOConfig(loss_agg_mode=mode))(logprobs, inputs).num_sequences) == count


def test_dual_clip_and_clamp_are_what_change_the_result():
    """Without dual clip the result differs (the batch exercises it), and the reference agrees either way."""
    logprobs, inputs = hard_batch(33)
    with_c, _, _ = ours_and_grad(GRPOLoss(), logprobs, inputs)
    without, _, _ = ours_and_grad(GRPOLoss(GRPOConfig(clip_ratio_c=None)), logprobs, inputs)
    ref_without, _ = ref_and_grad(logprobs, inputs, clip_c=None)
    assert abs(float(without) - float(ref_without)) < 1e-12 and abs(float(with_c) - float(without)) > 1e-3
    clamped_token_grad = ours_and_grad(GRPOLoss(), logprobs, inputs)[1]
    assert clamped_token_grad[0, 3] == 0 and clamped_token_grad[5, 4] == 0  # |log r| > 20: clamped, no gradient


def test_on_policy_gradients_per_mode():
    rewards = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    adv = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (1 + 1e-6)
    for mode in MODES:
        logprobs, inputs = make_batch([3], seed=22, rewards=rewards)
        inputs.anchor_logprobs = logprobs.detach().clone()
        out = GRPOLoss(GRPOConfig(loss_agg_mode=mode))(logprobs, inputs)
        (out.loss_sum / out.num_sequences).backward()
        n_tok = inputs.mask.sum(-1)
        per_seq = {"token-mean": -adv / n_tok.sum(), "seq-mean-token-mean": -adv / n_tok / 3,
                   "seq-mean-token-sum": -adv / 3}[mode]
        torch.testing.assert_close(logprobs.grad, per_seq[:, None] * inputs.mask, rtol=1e-12, atol=1e-14)


def test_dr_grpo_advantages_are_not_scaled():
    logprobs, inputs = hard_batch(34)
    ours, grad, _ = ours_and_grad(GRPOLoss(GRPOConfig(scale_advantages_by_std=False)), logprobs, inputs)
    ref, ref_grad = ref_and_grad(logprobs, inputs, scale=False)
    assert abs(float(ours) - float(ref)) < 1e-12
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


def test_skip_zero_variance_groups_drops_them_from_sum_and_count():
    logprobs, inputs = hard_batch(35)
    inputs.rewards[3:7] = 1.0  # group 1 (slots 4..6) and part of group 0 -> make group 1 constant
    inputs.rewards[4:7] = 2.0
    for mode in MODES:
        cfg = GRPOConfig(loss_agg_mode=mode, skip_zero_variance_groups=True)
        ours, grad, _ = ours_and_grad(GRPOLoss(cfg), logprobs, inputs)
        ref, ref_grad = ref_and_grad(logprobs, inputs, mode=mode, skip_groups=(1,))
        assert abs(float(ours) - float(ref)) < 1e-12
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


def test_kl_needs_reference_logprobs():
    logprobs, inputs = make_batch([2], seed=24)
    with pytest.raises(ValueError, match="ref_logprobs"):
        GRPOLoss(GRPOConfig(kl_coef=0.1))(logprobs, inputs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [[[0], [1, 2, 3]], [[2], [0, 3], [1]]])
def test_split_invariance(mode, splits):
    """One division by the global count: summing numerators and counts over parts equals the whole batch."""
    logprobs, inputs = hard_batch(36)
    inputs.ref_logprobs = None
    loss = GRPOLoss(GRPOConfig(loss_agg_mode=mode))
    whole, reference, _ = ours_and_grad(loss, logprobs, inputs)
    outs = [loss(*select_groups(logprobs, inputs, part)[:2]) for part in splits]
    value = sum(o.loss_sum for o in outs) / sum(o.num_sequences for o in outs)
    (grad,) = torch.autograd.grad(value, logprobs)
    assert abs(float(value) - float(whole)) < 1e-13
    torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-14)


def test_dapo_is_the_recipe_preset_of_grpo():
    cfg = DAPOConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c, cfg.loss_agg_mode, cfg.kl_coef) == (0.2, 0.28, 10.0, "token-mean", 0.0)
    logprobs, inputs = hard_batch(37)
    ours, grad, _ = ours_and_grad(DAPOLoss(), logprobs, inputs)
    ref, ref_grad = ref_and_grad(logprobs, inputs, clip_high=0.28, clip_c=10.0)
    assert abs(float(ours) - float(ref)) < 1e-12
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    assert build_loss("dapo", {"clip_high": 0.3}).config.clip_high == 0.3


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GRPOConfig(loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="dapo clip_ratio_c must be > 1"):
        DAPOConfig(clip_ratio_c=0.5)


def test_registry_builds_by_name_and_names_the_nearest():
    assert loss_names() == ["dapo", "gift", "grpo", "gspo"]
    gift = build_loss("gift", {"beta": 2.0, "grad_mode": "full"})
    assert isinstance(gift, GIFTLoss) and gift.config.beta == 2.0 and gift.config.grad_mode == "full"
    assert isinstance(build_loss("grpo", {"kl_coef": 0.01}), GRPOLoss)
    with pytest.raises(ValueError, match=r"unknown loss 'gitf'; did you mean 'gift'\?.*valid losses: dapo, gift, grpo, gspo"):
        build_loss("gitf")
    with pytest.raises(ValueError, match=r"unknown key 'bta'.*did you mean 'beta'"):
        build_loss("gift", {"bta": 1.0})
