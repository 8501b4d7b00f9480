"""Host-side checks of loss inputs: split groups, shapes, non-finite values; errors name the group."""
import pytest
import torch

from megatron_gift.algo import GroupSplitError, NonFiniteError, check_loss_inputs, check_no_group_in_two
from tests.unit.loss_batches import make_batch, select_groups


def test_valid_batch_passes():
    logprobs, inputs = make_batch([3, 2, 4], seed=0)
    check_loss_inputs(inputs, expected_sizes=[3, 2, 4], logprobs=logprobs)


def test_partial_group_is_an_error_naming_the_group():
    logprobs, inputs = make_batch([3, 2, 4], seed=0)
    _, sub, _ = select_groups(logprobs, inputs, [0, 2])
    keep = torch.tensor([0, 1, 2, 3, 4])  # group 102 keeps 2 of its 4 sequences
    sub.mask, sub.anchor_logprobs, sub.rewards = sub.mask[keep], sub.anchor_logprobs[keep], sub.rewards[keep]
    sub.group_index, sub.group_ids = sub.group_index[keep], sub.group_ids[keep]
    with pytest.raises(GroupSplitError, match="group 102 has 2 of its 4 sequences"):
        check_loss_inputs(sub, expected_sizes=[3, 4])


def test_non_contiguous_group_is_an_error():
    _, inputs = make_batch([2, 2], seed=0)
    inputs.group_index = torch.tensor([0, 1, 0, 1])
    with pytest.raises(GroupSplitError, match="contiguous"):
        check_loss_inputs(inputs)


def test_group_split_across_microbatches():
    with pytest.raises(GroupSplitError, match="group 7 is split across microbatches 0 and 2"):
        check_no_group_in_two([torch.tensor([5, 5, 7]), torch.tensor([6, 6]), torch.tensor([7, 8])])
    check_no_group_in_two([torch.tensor([5, 5]), torch.tensor([6, 6])])


def test_shape_mismatches_are_named():
    logprobs, inputs = make_batch([3], seed=1)
    with pytest.raises(ValueError, match=r"logprobs has shape \(3, 5\)"):
        check_loss_inputs(inputs, logprobs=logprobs[:, :5])
    inputs.rewards = inputs.rewards[:2]
    with pytest.raises(ValueError, match=r"rewards must have shape \(3,\)"):
        check_loss_inputs(inputs)


def test_non_finite_reward_names_group():
    _, inputs = make_batch([2, 3], seed=2)
    inputs.rewards[3] = float("nan")
    with pytest.raises(NonFiniteError, match="sequence 3 of group 101"):
        check_loss_inputs(inputs)


def test_non_finite_anchor_logprob_only_counts_on_mask():
    _, inputs = make_batch([2, 3], seed=3)
    row = 1
    masked_out = (inputs.mask[row] == 0).nonzero()
    if masked_out.numel():
        inputs.anchor_logprobs[row, masked_out[0, 0]] = float("-inf")
        check_loss_inputs(inputs)  # padding may hold anything
    tok = int((inputs.mask[row] == 1).nonzero()[0, 0])
    inputs.anchor_logprobs[row, tok] = float("-inf")
    with pytest.raises(NonFiniteError, match=f"anchor_logprobs at sequence 1, token {tok} of group 100"):
        check_loss_inputs(inputs)
