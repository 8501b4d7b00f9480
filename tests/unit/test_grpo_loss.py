"""GRPO baseline: independent reference loop, clipping, KL term, split invariance, registry."""
import math

import pytest
import torch

from megatron_gift.algo import GRPOConfig, GRPOLoss, build_loss, loss_names
from megatron_gift.algo.gift import GIFTLoss
from tests.unit.loss_batches import make_batch, select_groups


def reference_grpo(logprobs, inputs, sizes, clip=0.2, kl_coef=0.0, eps=1e-6):
    """Per-sequence, per-token loop: mean over sequences of token-mean clipped surrogate (+ k3 KL)."""
    total, start = 0.0, 0
    for n in sizes:
        r = inputs.rewards[start:start + n]
        adv = (r - r.mean()) / (r.std() + eps) if n > 1 else r / (1 + eps)
        for k in range(n):
            i, terms = start + k, []
            for t in range(logprobs.shape[1]):
                if inputs.mask[i, t] == 0:
                    continue
                ratio = torch.exp(logprobs[i, t] - inputs.anchor_logprobs[i, t])
                term = -torch.min(ratio * adv[k], torch.clamp(ratio, 1 - clip, 1 + clip) * adv[k])
                if kl_coef:
                    d = inputs.ref_logprobs[i, t] - logprobs[i, t]
                    term = term + kl_coef * (torch.exp(d) - d - 1)
                terms.append(term)
            total = total + sum(terms) / len(terms)
        start += n
    return total / sum(sizes)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_matches_reference_loop_and_its_gradient(kl_coef):
    sizes = [4, 3, 1]
    logprobs, inputs = make_batch(sizes, seed=21)
    with torch.no_grad():
        logprobs += 0.3 * torch.randn(logprobs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    inputs.anchor_logprobs = logprobs.detach() + 0.2 * torch.randn(logprobs.shape, dtype=torch.float64,
                                                                    generator=torch.Generator().manual_seed(3))
    inputs.ref_logprobs = logprobs.detach() - 0.1
    out = GRPOLoss(GRPOConfig(kl_coef=kl_coef))(logprobs, inputs)
    ours = out.loss_sum / out.num_sequences
    ours.backward()
    grad = logprobs.grad.clone()
    logprobs.grad = None
    ref = reference_grpo(logprobs, inputs, sizes, kl_coef=kl_coef)
    ref.backward()
    assert float(ours) == pytest.approx(float(ref), rel=1e-12)
    torch.testing.assert_close(grad, logprobs.grad, rtol=1e-10, atol=1e-13)
    assert 0 < float(out.metrics["clip_frac"][0]) < float(out.metrics["clip_frac"][1])


def test_on_policy_gradient_is_advantage_over_length():
    logprobs, inputs = make_batch([3], seed=22, rewards=torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    inputs.anchor_logprobs = logprobs.detach().clone()
    GRPOLoss()(logprobs, inputs).loss_sum.backward()
    adv = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (1 + 1e-6)
    expected = -(adv / inputs.mask.sum(-1))[:, None] * inputs.mask
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-14)


def test_clipped_tokens_get_no_gradient():
    logprobs, inputs = make_batch([2], seed=23, rewards=torch.tensor([1.0, 0.0], dtype=torch.float64))
    inputs.anchor_logprobs = logprobs.detach() - math.log(1.5)  # ratio 1.5 > 1.2: positive advantage clipped
    GRPOLoss()(logprobs, inputs).loss_sum.backward()
    assert torch.all(logprobs.grad[0] == 0)
    assert torch.all(logprobs.grad[1][inputs.mask[1] == 1] != 0)  # negative advantage, ratio above range: unclipped


def test_kl_needs_reference_logprobs():
    logprobs, inputs = make_batch([2], seed=24)
    with pytest.raises(ValueError, match="ref_logprobs"):
        GRPOLoss(GRPOConfig(kl_coef=0.1))(logprobs, inputs)


@pytest.mark.parametrize("splits", [[[0, 1, 2]], [[0], [1, 2]], [[2], [0], [1]]])
def test_split_invariance(splits):
    logprobs, inputs = make_batch([3, 2, 4], seed=25)
    loss = GRPOLoss()
    whole = loss(logprobs, inputs)
    (whole.loss_sum / whole.num_sequences).backward()
    reference = logprobs.grad.clone()
    logprobs.grad = None
    outs = [loss(*select_groups(logprobs, inputs, part)[:2]) for part in splits]
    (sum(o.loss_sum for o in outs) / sum(o.num_sequences for o in outs)).backward()
    torch.testing.assert_close(logprobs.grad, reference, rtol=1e-12, atol=1e-14)


def test_registry_builds_by_name_and_names_the_nearest():
    assert loss_names() == ["gift", "grpo"]
    gift = build_loss("gift", {"beta": 2.0, "grad_mode": "full"})
    assert isinstance(gift, GIFTLoss) and gift.config.beta == 2.0 and gift.config.grad_mode == "full"
    assert isinstance(build_loss("grpo", {"kl_coef": 0.01}), GRPOLoss)
    with pytest.raises(ValueError, match=r"unknown loss 'gitf'; did you mean 'gift'\?.*valid losses: gift, grpo"):
        build_loss("gitf")
    with pytest.raises(ValueError, match=r"unknown key 'bta'.*did you mean 'beta'"):
        build_loss("gift", {"bta": 1.0})
