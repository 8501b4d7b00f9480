"""Token-budget binning (first-fit decreasing) and the packed row layout (algo/seq_packing.py)."""
import pytest
import torch

from megatron_gift.algo import check_loss_inputs
from megatron_gift.algo.packing import RolloutGroup, collate, pack_microbatches, split_by_tokens
from megatron_gift.algo.seq_packing import block_causal_mask, padding_fraction, to_sequences


def groups_of(lengths, size=2, prompt=3):
    gen = torch.Generator().manual_seed(0)
    return [RolloutGroup(group_id=g, prompt=torch.randint(1, 50, (prompt,), generator=gen),
                         responses=[torch.randint(1, 50, (n,), generator=gen) for _ in range(size)],
                         rewards=torch.rand(size, generator=gen)) for g, n in enumerate(lengths)]


def test_first_fit_decreasing_fills_bins_the_greedy_split_leaves_half_empty():
    # padded cost = sequences x longest: in order, [long, short, long, short] needs 4 bins of budget 2 x 13
    groups = groups_of([10, 2, 10, 2])
    parts = split_by_tokens(groups, max_tokens=2 * 2 * 13)
    assert sorted(sorted(g.group_id for g in p) for p in parts) == [[0, 2], [1, 3]]
    for p in parts:
        assert sum(g.size for g in p) * max(g.max_len for g in p) <= 52
    # packed cost = real tokens (26 per long group, 10 per short one): two full bins of 62
    packed = split_by_tokens(groups_of([10, 2, 10, 2, 2, 2]), max_tokens=62, packed=True)
    assert sorted(sum(g.num_tokens for g in p) for p in packed) == [30, 62]


def test_packed_rows_hold_each_sequence_once_with_restarting_positions():
    groups = groups_of([5, 1, 7, 2], size=3)
    (padded,) = pack_microbatches(groups, num_microbatches=1, pad_to_multiple=1)
    for mode in ("rows", "thd"):
        (mb,) = pack_microbatches(groups, max_tokens=1000, packed=mode, pad_to_multiple=4)
        lay = mb.packed
        assert mb.loss_inputs is not None and mb.sequence_shape == padded.shape
        m = padded.loss_inputs.mask.bool()
        assert torch.equal(to_sequences(mb.targets, lay)[m], padded.targets[m])  # every response token once
        for i, n in enumerate(lay.lengths.tolist()):
            assert torch.equal(to_sequences(mb.tokens, lay)[i, :n], padded.tokens[i, :n])
            assert torch.equal(to_sequences(mb.position_ids, lay)[i, :n], torch.arange(n))
        assert int((lay.segment_ids >= 0).sum()) == int(lay.lengths.sum())
        check_loss_inputs(mb.loss_inputs, expected_sizes=mb.group_sizes)
    assert mb.shape[0] == 1 and torch.equal(lay.cu_seqlens_padded[1:] % 4, torch.zeros(12, dtype=torch.int32))
    assert lay.cu_seqlens[-1] == int(lay.lengths.sum())
    (rows,) = pack_microbatches(groups, max_tokens=1000, packed="rows")
    assert rows.shape[0] < padded.shape[0]  # shorter sequences share rows
    assert padding_fraction([rows]) < padding_fraction([padded])


def test_block_causal_mask_keeps_attention_inside_a_sequence():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = ~block_causal_mask(seg)[0, 0]
    expect = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expect)


def test_packed_budget_refuses_a_group_larger_than_the_budget():
    with pytest.raises(Exception, match="two-pass schedule"):
        pack_microbatches(groups_of([10]), max_tokens=20, packed="rows")
    with pytest.raises(ValueError, match="packing mode"):
        from megatron_gift.algo.seq_packing import pack_rows
        pack_rows(collate(groups_of([3])), "bshd")


def test_interleaved_pipelines_get_a_multiple_of_pp_microbatches():
    from megatron_gift.algo.packing import round_count
    groups = groups_of([10, 2, 10, 2, 2, 2])
    mbs = pack_microbatches(groups, max_tokens=62, packed="rows", count_multiple=4)
    assert len(mbs) == 4 and sorted(int(g) for mb in mbs for g in mb.loss_inputs.group_ids.unique()) == list(range(6))
    with pytest.raises(ValueError, match="multiple of 4 microbatches"):
        round_count([[groups[0]], [groups[1]], [groups[2]]], 4)


def test_expert_parallel_ranks_get_at_least_the_largest_count():
    """min_count (the trainer passes the largest count of any data-parallel rank under EP): bins are split,
    each within the budget, every group kept once; a count above the groups is an error naming the budget."""
    from megatron_gift.algo.packing import round_count
    groups = groups_of([10, 2, 10, 2, 2, 2])
    alone = pack_microbatches(groups, max_tokens=62, packed="rows")
    mbs = pack_microbatches(groups, max_tokens=62, packed="rows", min_count=len(alone) + 2)
    assert len(mbs) == len(alone) + 2
    assert sorted(int(g) for mb in mbs for g in mb.loss_inputs.group_ids) == sorted(
        int(g) for mb in alone for g in mb.loss_inputs.group_ids)
    assert all(int(mb.extras["seq_lengths"].sum()) <= 62 for mb in mbs)
    assert len(pack_microbatches(groups, max_tokens=62, packed="rows", min_count=3, count_multiple=2)) == 4
    with pytest.raises(ValueError, match="cannot form a multiple of 1 microbatches, at least 7 .*max_tokens_per_micro"):
        round_count([[g] for g in groups], 1, at_least=7)
