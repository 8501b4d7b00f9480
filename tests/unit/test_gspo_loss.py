"""GSPO: the sequence-level ratio and clipping against the paper's sequence objective in float64."""

import pytest
import torch

from megatron_gift.algo import GSPOConfig, GSPOLoss, build_loss
from tests.unit.loss_batches import make_batch, select_groups
from tests.unit.policy_reference import reference_gspo

SIZES = [4, 3, 1, 2]


def batch(seed, spread):
    logprobs, inputs = make_batch(SIZES, seq_len=7, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs.anchor_logprobs = logprobs.detach() + spread * (torch.rand(logprobs.shape, generator=gen, dtype=torch.float64) - 0.5)
    inputs.mask[2] = 0.0  # an empty response: no term, still a sequence of the mean
    return logprobs, inputs


@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.2, 0.28), (0.9, 5.0)])
@pytest.mark.parametrize("spread", [1e-3, 0.5])
def test_matches_sequence_objective_and_its_gradient(clip, spread):
    logprobs, inputs = batch(41, spread)
    out = GSPOLoss(GSPOConfig(clip_low=clip[0], clip_high=clip[1]))(logprobs, inputs)
    ours = out.loss_sum / out.num_sequences
    (grad,) = torch.autograd.grad(ours, logprobs)
    ref = reference_gspo(logprobs, inputs, SIZES, clip_low=clip[0], clip_high=clip[1])
    (ref_grad,) = torch.autograd.grad(ref, logprobs)
    assert abs(float(ours) - float(ref)) <= 1e-12 * max(1.0, abs(float(ref)))
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)
    assert float(out.num_sequences) == sum(SIZES)


def test_clipping_is_per_sequence():
    """A sequence whose mean log-ratio is inside the range keeps every token's gradient, even tokens whose own
    ratio is far outside it (token-level PPO would clip those)."""
    logprobs, inputs = make_batch([2], seq_len=6, seed=42, rewards=torch.tensor([1.0, 0.0], dtype=torch.float64))
    inputs.mask[:] = 0.0
    inputs.mask[:, 1:5] = 1.0
    inputs.anchor_logprobs = logprobs.detach().clone()
    inputs.anchor_logprobs[0, 1] -= 0.5
    inputs.anchor_logprobs[0, 2] += 0.5  # mean log-ratio 0: s = 1 although two tokens have ratios e^{+-0.5}
    out = GSPOLoss(GSPOConfig(clip_low=0.2, clip_high=0.2))(logprobs, inputs)
    (grad,) = torch.autograd.grad(out.loss_sum / out.num_sequences, logprobs)
    assert torch.all(grad[0, 1:5] != 0) and float(out.metrics["clip_frac"][0]) == 0
    inputs.anchor_logprobs[0, 1:5] -= 0.5  # now s = e^0.5 > 1.2 with A > 0: the whole sequence is clipped
    out = GSPOLoss(GSPOConfig(clip_low=0.2, clip_high=0.2))(logprobs, inputs)
    (grad,) = torch.autograd.grad(out.loss_sum / out.num_sequences, logprobs)
    assert torch.all(grad[0] == 0) and float(out.metrics["clip_frac"][0]) == 1


def test_split_invariance_and_registry():
    logprobs, inputs = batch(43, 0.5)
    loss = build_loss("gspo", {"clip_low": 0.2, "clip_high": 0.2})
    whole = loss(logprobs, inputs)
    outs = [loss(*select_groups(logprobs, inputs, part)[:2]) for part in ([0, 3], [1], [2])]
    assert abs(float(sum(o.loss_sum for o in outs) / sum(o.num_sequences for o in outs))
               - float(whole.loss_sum / whole.num_sequences)) < 1e-14
    with pytest.raises(ValueError, match="gspo clip_low"):
        build_loss("gspo", {"clip_low": 1.5})
    with pytest.raises(ValueError, match="unknown key 'loss_agg_mode'"):
        build_loss("gspo", {"loss_agg_mode": "token-mean"})  # GSPO defines one aggregation only
