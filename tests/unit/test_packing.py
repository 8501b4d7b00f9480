"""Group-atomic packing: token layout, target / mask alignment, budgets and errors."""
import pytest
import torch

from megatron_gift.algo import GroupSplitError, check_loss_inputs
from megatron_gift.algo.packing import RolloutGroup, pack_microbatches, shard_groups


def make_groups(n_groups=4, size=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        prompt = torch.randint(1, 50, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen)
        responses = [torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)
                     for _ in range(size)]
        groups.append(RolloutGroup(group_id=10 + g, prompt=prompt, responses=responses,
                                   rewards=torch.rand(size, generator=gen),
                                   rollout_logprobs=[-torch.rand(r.numel(), generator=gen) for r in responses]))
    return groups


def test_targets_and_mask_select_exactly_the_response_tokens():
    groups = make_groups()
    (mb,) = pack_microbatches(groups, num_microbatches=1)
    row = 0
    for g in groups:
        for i, resp in enumerate(g.responses):
            sel = mb.loss_inputs.mask[row].bool()
            assert torch.equal(mb.targets[row][sel], resp)
            assert torch.equal(mb.rollout_logprobs[row][sel], g.rollout_logprobs[i])
            p = g.prompt.numel()
            assert torch.equal(mb.tokens[row, :p + resp.numel()], torch.cat([g.prompt, resp]))
            row += 1
    assert mb.shape[1] % 8 == 0
    check_loss_inputs(mb.loss_inputs, expected_sizes=mb.group_sizes)


def test_by_count_keeps_groups_whole_and_uniform_length():
    groups = make_groups(n_groups=4)
    mbs = pack_microbatches(groups, num_microbatches=2, uniform_length=True)
    assert [mb.loss_inputs.group_ids.unique().tolist() for mb in mbs] == [[10, 11], [12, 13]]
    assert mbs[0].shape == mbs[1].shape
    with pytest.raises(ValueError, match="cannot form 3 microbatches of whole groups"):
        pack_microbatches(groups, num_microbatches=3)


def test_by_token_budget_never_splits_a_group():
    groups = make_groups(n_groups=6, size=4, seed=1)
    budget = max(g.size * g.max_len for g in groups) + 10
    mbs = pack_microbatches(groups, max_tokens=budget, pad_to_multiple=1)
    seen = [gid for mb in mbs for gid in mb.loss_inputs.group_ids.unique().tolist()]
    assert sorted(seen) == [g.group_id for g in groups]  # each group in exactly one microbatch
    for mb in mbs:
        assert mb.shape[0] * mb.shape[1] <= budget
        check_loss_inputs(mb.loss_inputs, expected_sizes=mb.group_sizes)
    with pytest.raises(GroupSplitError, match="two-pass schedule"):
        pack_microbatches(groups, max_tokens=5)


def test_shard_groups_over_data_parallel_ranks():
    groups = make_groups(n_groups=4)
    assert [g.group_id for g in shard_groups(groups, 2, 1)] == [12, 13]
    with pytest.raises(ValueError, match="4 prompt groups cannot be split evenly over 3"):
        shard_groups(groups, 3, 0)


def test_bad_groups_are_named():
    groups = make_groups(n_groups=2)
    groups[1].rewards = torch.rand(2)
    with pytest.raises(ValueError, match="group 11 has 3 responses but rewards of shape"):
        pack_microbatches(groups, num_microbatches=1)


def test_metric_pairs_sum_and_max_metrics_take_the_maximum():
    from megatron_gift.algo.types import metric, reduce_metrics
    parts = [{"loss": metric(torch.tensor(2.0), 4), "x_max": metric(torch.tensor(0.5), 1)},
             {"loss": metric(torch.tensor(1.0), 2), "x_max": metric(torch.tensor(0.25), 1)}]
    out = reduce_metrics(parts)
    assert out["loss"].tolist() == [3.0, 6.0] and out["x_max"].tolist() == [0.5, 1.0]
