"""GIFT loss: hand-computed values, docs/algorithm.md invariances, autograd vs analytic coefficients, edge cases."""
import math

import pytest
import torch

from megatron_gift.algo import GIFTConfig, GIFTLoss
from megatron_gift.algo.types import LossInputs
from tests.unit.loss_batches import make_batch, select_groups

MODES = ["detached", "full"]


def reference_gift(h, rewards, sizes, beta=1.0, eps=1e-6, singleton="released"):
    """Independent per-group loop in float64: mean over all sequences of (A - beta z)^2 (singletons: the
    released code's implicit mean h, detached, or mean 0)."""
    total, start = 0.0, 0
    for n in sizes:
        r, hh = rewards[start:start + n], h[start:start + n]
        if n == 1:
            a = r / (1 + eps)
            z = (hh - hh.detach()) / (1 + eps) if singleton == "released" else hh / (1 + eps)
        else:
            a = (r - r.mean()) / (r.std(unbiased=True) + eps)
            z = (hh - hh.mean()) / (hh.std(unbiased=True) + eps)
        total = total + ((a - beta * z) ** 2).sum()
        start += n
    return total / sum(sizes)


def loss_value(loss, logprobs, inputs):
    out = loss(logprobs, inputs)
    return out.loss_sum / out.num_sequences


def inputs_for(rewards, sizes):
    idx = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    b = len(rewards)
    return LossInputs(mask=torch.ones(b, 1, dtype=torch.float64), anchor_logprobs=torch.zeros(b, 1, dtype=torch.float64),
                      rewards=torch.tensor(rewards, dtype=torch.float64), group_index=idx, num_groups=len(sizes))


@pytest.mark.parametrize("mode", MODES)
def test_hand_computed_two_groups(mode):
    # Group 1: R = (1, 0), h = (0.3, 0.1): A = z = (+1/sqrt2, -1/sqrt2), residual 0.
    # Group 2: R = (0, 1, 2), h = (0.2, 0.2, 0.5): A = (-1, 0, 1), z = (-1/sqrt3, -1/sqrt3, 2/sqrt3),
    # sum of squared residuals = 4 - 2 sqrt3; loss = (4 - 2 sqrt3) / 5.
    inputs = inputs_for([1.0, 0.0, 0.0, 1.0, 2.0], [2, 3])
    h = torch.tensor([[0.3], [0.1], [0.2], [0.2], [0.5]], dtype=torch.float64)
    out = GIFTLoss(GIFTConfig(grad_mode=mode))(h, inputs)
    assert float(out.num_sequences) == 5
    assert float(out.loss_sum / out.num_sequences) == pytest.approx((4 - 2 * math.sqrt(3)) / 5, abs=1e-5)
    assert float(out.metrics["loss"][0] / out.metrics["loss"][1]) == pytest.approx((4 - 2 * math.sqrt(3)) / 5, abs=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_matches_independent_reference(mode):
    sizes = [4, 3, 1, 5]
    logprobs, inputs = make_batch(sizes, seed=3)
    loss = GIFTLoss(GIFTConfig(grad_mode=mode, beta=0.7))
    h = loss.sequence_log_ratios(logprobs, inputs)
    expected = reference_gift(h.detach(), inputs.rewards, sizes, beta=0.7)
    assert float(loss_value(loss, logprobs, inputs)) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_log_ratio_is_masked_sum(mode):
    logprobs, inputs = make_batch([3, 2], seed=1)
    h = GIFTLoss(GIFTConfig(grad_mode=mode)).sequence_log_ratios(logprobs, inputs)
    for i in range(5):
        keep = inputs.mask[i].bool()
        assert float(h[i]) == pytest.approx(float((logprobs[i, keep] - inputs.anchor_logprobs[i, keep]).sum()), abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_autograd_equals_analytic_coefficients(mode):
    sizes = [4, 3, 1, 2, 5]
    rewards = torch.tensor([1, 0, 2, 1, 3, 3, 3, 0.5, 1, 0, 2, 1, 1, 0, 2], dtype=torch.float64)  # group 2: all equal
    for skip in (False, True):
        logprobs, inputs = make_batch(sizes, seed=5, rewards=rewards)
        loss = GIFTLoss(GIFTConfig(grad_mode=mode, beta=1.3, skip_zero_variance_groups=skip))
        h = loss.sequence_log_ratios(logprobs, inputs).detach().requires_grad_(True)
        out = loss.from_log_ratios(h, inputs)
        (out.loss_sum / out.num_sequences).backward()
        c = loss.coefficients(h, inputs, out.num_sequences)
        torch.testing.assert_close(h.grad, c, rtol=1e-10, atol=1e-12)


def test_full_mode_matches_spec_closed_forms():
    # With eps -> 0: group loss = (N-1)/N (1 - 2 beta rho + beta^2), and dL/dh_j = -(2 beta/(N_t s)) (A_j - rho z_j).
    sizes, beta = [5, 4], 0.8
    logprobs, inputs = make_batch(sizes, seed=11, rewards=torch.tensor([1., 0, 2, 3, 1, 0, 1, 2, 5], dtype=torch.float64))
    loss = GIFTLoss(GIFTConfig(grad_mode="full", beta=beta, eps=1e-12))
    h = loss.sequence_log_ratios(logprobs, inputs).detach()
    out = loss.from_log_ratios(h, inputs)
    n_total, start, expected_loss, expected_c = 9, 0, 0.0, []
    for n in sizes:
        r, hh = inputs.rewards[start:start + n], h[start:start + n]
        a, s = (r - r.mean()) / r.std(), hh.std()
        z = (hh - hh.mean()) / s
        rho = float(torch.corrcoef(torch.stack([r, hh]))[0, 1])
        expected_loss += n * (n - 1) / n * (1 - 2 * beta * rho + beta ** 2)
        expected_c.append(-(2 * beta / (n_total * s)) * (a - rho * z))
        start += n
    assert float(out.loss_sum / n_total) == pytest.approx(expected_loss / n_total, rel=1e-9)
    torch.testing.assert_close(loss.coefficients(h, inputs, n_total), torch.cat(expected_c), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_invariant_to_constant_shift_per_group(mode):
    sizes = [4, 3, 5]
    _, inputs = make_batch(sizes, seed=2)
    loss = GIFTLoss(GIFTConfig(grad_mode=mode))
    h0 = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([3.5, -120.0, 0.25], dtype=torch.float64)[inputs.group_index]
    grads, values = [], []
    for h in (h0.clone(), h0 + shift):
        h.requires_grad_(True)
        out = loss.from_log_ratios(h, inputs)
        (out.loss_sum / out.num_sequences).backward()
        grads.append(h.grad)
        values.append(float(out.loss_sum))
    assert values[0] == pytest.approx(values[1], rel=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_invariant_to_positive_scale_per_group(mode):
    # Exact up to eps (eps / std relative), so a tiny eps makes the invariance tight.
    _, inputs = make_batch([4, 3, 5], seed=4)
    loss = GIFTLoss(GIFTConfig(grad_mode=mode, eps=1e-12))
    h = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scaled = h * torch.tensor([0.1, 7.0, 2.5], dtype=torch.float64)[inputs.group_index]
    a, b = loss.from_log_ratios(h, inputs), loss.from_log_ratios(scaled, inputs)
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("splits", [[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2], [3]], [[3, 0], [2, 1]]])
def test_microbatch_and_data_parallel_split_gives_same_gradient(mode, splits):
    # Each part plays a microbatch (or a data-parallel rank): sum of loss_sums, one division by the global count.
    logprobs, inputs = make_batch([3, 4, 1, 5], seed=7)
    loss = GIFTLoss(GIFTConfig(grad_mode=mode))
    whole = loss(logprobs, inputs)
    (whole.loss_sum / whole.num_sequences).backward()
    reference = logprobs.grad.clone()
    logprobs.grad = None
    outs = [loss(*select_groups(logprobs, inputs, part)[:2]) for part in splits]
    total = sum(o.num_sequences for o in outs)
    assert float(total) == float(whole.num_sequences)
    (sum(o.loss_sum for o in outs) / total).backward()
    torch.testing.assert_close(logprobs.grad, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_permutation_inside_group_permutes_only_that(mode):
    logprobs, inputs = make_batch([4, 3], seed=8)
    loss = GIFTLoss(GIFTConfig(grad_mode=mode))
    out = loss(logprobs, inputs)
    out.loss_sum.backward()
    grad = logprobs.grad.clone()
    perm = torch.tensor([2, 0, 3, 1, 4, 5, 6])
    lp2 = logprobs.detach()[perm].clone().requires_grad_(True)
    inputs2 = LossInputs(mask=inputs.mask[perm], anchor_logprobs=inputs.anchor_logprobs[perm],
                         rewards=inputs.rewards[perm], group_index=inputs.group_index[perm], num_groups=2)
    out2 = loss(lp2, inputs2)
    out2.loss_sum.backward()
    assert float(out2.loss_sum) == pytest.approx(float(out.loss_sum), rel=1e-12)
    torch.testing.assert_close(lp2.grad, grad[perm], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_masked_tokens_have_zero_gradient(mode):
    logprobs, inputs = make_batch([3, 3], seed=9)
    out = GIFTLoss(GIFTConfig(grad_mode=mode))(logprobs, inputs)
    out.loss_sum.backward()
    assert torch.all(logprobs.grad[inputs.mask == 0] == 0)
    assert torch.count_nonzero(logprobs.grad[inputs.mask == 1]) > 0


def test_equal_rewards_edge_cases():
    # All rewards equal: A = 0. detached -> loss beta^2 mean(z^2) with nonzero grad; full -> constant loss, ~zero grad.
    logprobs, inputs = make_batch([4], seed=10, rewards=torch.full((4,), 2.0, dtype=torch.float64))
    for mode in MODES:
        loss = GIFTLoss(GIFTConfig(grad_mode=mode, beta=2.0))
        h = loss.sequence_log_ratios(logprobs, inputs).detach().requires_grad_(True)
        out = loss.from_log_ratios(h, inputs)
        z = (h.detach() - h.detach().mean()) / (h.detach().std() + 1e-6)
        assert float(out.loss_sum) == pytest.approx(float(4.0 * (z ** 2).sum()), rel=1e-9)
        out.loss_sum.backward()
        if mode == "detached":
            assert float(h.grad.abs().max()) > 0.1
        else:
            assert float(h.grad.abs().max()) < 1e-4
        assert float(out.metrics["zero_reward_std_frac"][0]) == 1.0
    skipped = GIFTLoss(GIFTConfig(skip_zero_variance_groups=True))(logprobs, inputs)
    assert float(skipped.num_sequences) == 0 and float(skipped.loss_sum) == 0


def test_zero_implicit_std_scales_like_inverse_eps_and_is_flagged():
    # First step with anchor `ref`: policy == anchor, so h = 0, z = 0 and the gradient is ~1/eps.
    _, inputs = make_batch([4, 2], seed=12, rewards=torch.tensor([0., 1, 2, 3, 1, 0], dtype=torch.float64))
    logprobs = inputs.anchor_logprobs.clone().requires_grad_(True)
    for eps in (1e-6, 1e-3):
        logprobs.grad = None
        out = GIFTLoss(GIFTConfig(eps=eps))(logprobs, inputs)
        assert float(out.loss_sum / out.num_sequences) == pytest.approx(
            float(reference_gift(torch.zeros(6, dtype=torch.float64), inputs.rewards, [4, 2], eps=eps)), rel=1e-9)
        out.loss_sum.backward()
        # detached: d(loss_sum)/dh_j = -2 beta (A_j - beta z_j) / (std + eps) with z = 0, std = 0.
        r, adv = inputs.rewards, torch.zeros(6, dtype=torch.float64)
        for sl in (slice(0, 4), slice(4, 6)):
            adv[sl] = (r[sl] - r[sl].mean()) / (r[sl].std() + eps)
        expected = (-2.0 * adv / eps)[:, None] * inputs.mask
        torch.testing.assert_close(logprobs.grad, expected, rtol=1e-9, atol=1e-9)
        assert float(out.metrics["tiny_implicit_std_frac"][0] / out.metrics["tiny_implicit_std_frac"][1]) == 1.0


@pytest.mark.parametrize("mode", MODES)
def test_singleton_group_follows_the_released_code(mode):
    """Released convention (issue 17): implicit mean h (detached), std 1: z = 0 in value, gradient 1, so the
    loss is A^2 and dL/dh = -2 beta A / (1 + eps)^2; the coefficients of the two-pass schedule agree."""
    inputs = inputs_for([0.7, 0.0, 1.0], [1, 2])
    h = torch.tensor([[0.4], [0.1], [0.3]], dtype=torch.float64, requires_grad=True)
    loss = GIFTLoss(GIFTConfig(beta=0.5, grad_mode=mode))
    out = loss(h, inputs)
    ref = reference_gift(h[:, 0], inputs.rewards, [1, 2], beta=0.5)
    assert abs(float(out.loss_sum / 3) - float(ref)) < 1e-14
    assert float(out.loss_sum) == pytest.approx((0.7 / (1 + 1e-6)) ** 2 + 2 * (1 / math.sqrt(2) * (1 - 0.5)) ** 2, rel=1e-5)
    (grad,) = torch.autograd.grad(out.loss_sum / 3, h)
    (ref_grad,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(grad[0], ref_grad[0], rtol=1e-10, atol=1e-14)  # the reference loop is `full`
    if mode == "full":
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert float(grad[0]) == pytest.approx(-2 * 0.5 * 0.7 / (1 + 1e-6) ** 2 / 3, rel=1e-9)
    torch.testing.assert_close(loss.coefficients(h[:, 0], inputs, 3.0), grad[:, 0], rtol=1e-6, atol=1e-12)


def test_singleton_group_zero_mean_option():
    inputs = inputs_for([0.7], [1])
    h = torch.tensor([[0.4]], dtype=torch.float64, requires_grad=True)
    out = GIFTLoss(GIFTConfig(beta=1.0, singleton_implicit="zero_mean"))(h, inputs)
    assert float(out.loss_sum) == pytest.approx(((0.7 - 0.4) / (1 + 1e-6)) ** 2, rel=1e-12)
    out.loss_sum.backward()
    assert float(h.grad) == pytest.approx(-2 * (0.7 - 0.4) / (1 + 1e-6) ** 2, rel=1e-9)


def test_metrics_are_tensor_pairs():
    logprobs, inputs = make_batch([3, 4], seed=13)
    out = GIFTLoss()(logprobs, inputs)
    assert {"loss", "abs_residual", "log_ratio_mean", "rho", "tiny_implicit_std_frac", "zero_reward_std_frac"} <= set(out.metrics)
    for value in out.metrics.values():
        assert isinstance(value, torch.Tensor) and value.shape == (2,) and not value.requires_grad
    assert -1.0 <= float(out.metrics["rho"][0] / out.metrics["rho"][1]) <= 1.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="grad_mode"):
        GIFTConfig(grad_mode="partial")
    with pytest.raises(ValueError, match="anchor"):
        GIFTConfig(anchor="sft")
    with pytest.raises(ValueError, match="beta"):
        GIFTConfig(beta=0.0)
