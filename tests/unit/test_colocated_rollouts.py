"""Placement of colocated rollout engines and the hand-over of scored groups (rollout/colocated.py).

The multi-rank exchange runs on 4 gloo processes: every rank contributes the groups its engine scored,
every replica gets exactly its share, in global order."""
import pytest
import torch

from megatron_gift.algo.packing import RolloutGroup
from megatron_gift.rollout.colocated import EnginePlacement, RolloutStats, balanced_slice, exchange_groups


def test_balanced_slices_cover_the_batch_once_in_order():
    for total in (0, 1, 7, 16, 17):
        for parts in (1, 2, 3, 4, 5):
            cuts = [balanced_slice(total, parts, i) for i in range(parts)]
            assert cuts[0][0] == 0 and cuts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
            sizes = [b - a for a, b in cuts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert balanced_slice(10, 4, 1) == (3, 6)
    with pytest.raises(ValueError, match="part 4 of 4"):
        balanced_slice(10, 4, 4)


def test_engine_placement():
    p = EnginePlacement(rank=5, world_size=8, engine_tp=2)
    assert (p.num_engines, p.engine_index, p.is_engine_leader) == (4, 2, False)
    assert p.share(16) == (8, 12)
    assert EnginePlacement(rank=4, world_size=8, engine_tp=2).is_engine_leader
    with pytest.raises(ValueError, match="tensor_parallel_size = 3 must divide the world size 8"):
        EnginePlacement(rank=0, world_size=8, engine_tp=3)
    # Pure data parallelism with one-rank engines: every engine's slice is its replica's, no exchange.
    assert not EnginePlacement(rank=1, world_size=2).needs_exchange(dp=2)
    assert EnginePlacement(rank=1, world_size=2).needs_exchange(dp=1)  # TP or PP = 2: one replica, two engines
    assert EnginePlacement(rank=1, world_size=2, engine_tp=2).needs_exchange(dp=2)


def _group(gid: int) -> RolloutGroup:
    return RolloutGroup(group_id=gid, prompt=torch.tensor([gid, 1]), responses=[torch.tensor([gid]), torch.tensor([2])],
                        rewards=torch.tensor([float(gid), 0.5]),
                        rollout_logprobs=[torch.tensor([-0.1 * gid - 1e-7]), torch.tensor([-2.5])])


def _same(a: RolloutGroup, b: RolloutGroup) -> bool:
    return (a.group_id == b.group_id and torch.equal(a.prompt, b.prompt) and torch.equal(a.rewards, b.rewards)
            and all(torch.equal(x, y) for x, y in zip(a.responses, b.responses)) and a.size == b.size
            and (a.rollout_logprobs is None) == (b.rollout_logprobs is None)
            and all(torch.equal(x, y) for x, y in zip(a.rollout_logprobs or [], b.rollout_logprobs or [])))


def test_wire_format_round_trip_is_exact():
    from megatron_gift.rollout.wire import decode_groups, encode_groups
    gen = torch.Generator().manual_seed(0)
    groups = [RolloutGroup(7, torch.randint(0, 150_000, (5,), generator=gen),
                           [torch.randint(0, 150_000, (n,), generator=gen) for n in (3, 1, 9)],
                           torch.randn(3, generator=gen), [torch.randn(n, generator=gen) for n in (3, 1, 9)]),
              _group(2), RolloutGroup(3, torch.tensor([1]), [torch.tensor([4, 5])], torch.tensor([1.0]))]
    flat = encode_groups(groups)
    assert flat.dtype == torch.int32 and flat.numel() == (4 + 3 + 5 + 13 + 3 + 13) + (4 + 2 + 2 + 2 + 2 + 2) + (4 + 1 + 1 + 2 + 1)
    back = decode_groups(flat)
    assert len(back) == 3 and all(_same(a, b) for a, b in zip(groups, back))
    assert decode_groups(encode_groups([])) == []


def test_exchange_without_communication_checks_the_ids():
    placement = EnginePlacement(rank=0, world_size=1)
    got = exchange_groups([_group(1), _group(0)], (0, 2), placement, dp=1)
    assert [g.group_id for g in got] == [0, 1]
    with pytest.raises(RuntimeError, match="expected the groups 0..2 of this step, got \\[0, 1\\]"):
        exchange_groups([_group(0), _group(1)], (0, 3), placement, dp=1)


def test_stats_term_means_single_process():
    stats = RolloutStats(samples=4.0, tokens=10.0, term_sums={"math_verify": 3.0})
    reduced = stats.reduced(["math_verify", "format"], torch.device("cpu"))
    assert reduced.tokens == 10.0 and reduced.term_means() == {"math_verify": 0.75, "format": 0.0}
    assert RolloutStats().term_means() == {}


def _exchange_worker(rank: int, world: int):
    import torch.distributed as dist
    # 4 ranks, engines of 2 ranks (engine leaders 0 and 2), 2 replicas (dp rank = rank % 2, as Megatron's
    # order puts TP neighbours next to each other when tp=1, pp=2: replica r holds ranks r and r + 2).
    placement = EnginePlacement(rank, world, engine_tp=2)
    batch = 8
    start, stop = placement.share(batch)
    local = [_group(g) for g in range(start, stop)] if placement.is_engine_leader else []
    dp_rank = rank % 2
    wanted = balanced_slice(batch, 2, dp_rank)
    got = exchange_groups(local, wanted, placement, dp=2)
    from megatron_gift.rollout.colocated import last_received_bytes
    from megatron_gift.rollout.wire import encode_groups
    exact = all(_same(g, _group(g.group_id)) for g in got)
    share_bytes = 4 * encode_groups([_group(g) for g in range(*wanted)]).numel()
    stats = RolloutStats(samples=float(2 * len(local)), tokens=float(3 * len(local)),
                         term_sums={"r": float(sum(g.rewards.sum() for g in local))}).reduced(["r"], torch.device("cpu"))
    dist.barrier()
    return {"ids": [g.group_id for g in got], "first_reward": float(got[0].rewards[0]), "exact": exact,
            "received": last_received_bytes(), "share_bytes": share_bytes,
            "samples": stats.samples, "tokens": stats.tokens, "r": stats.term_sums["r"]}


@pytest.mark.distributed
def test_exchange_over_four_ranks_gives_each_replica_its_share():
    from megatron_gift.mcore.testing.harness import run_distributed
    results = run_distributed(_exchange_worker, world_size=4)
    for rank, res in enumerate(results):
        want = list(range(0, 4)) if rank % 2 == 0 else list(range(4, 8))
        assert res["ids"] == want, (rank, res)
        assert res["first_reward"] == float(want[0]) and res["exact"]
        assert res["received"] == res["share_bytes"] > 0  # its replica's share only, not the whole step
        # 8 groups of 2 samples, rewards gid and 0.5 each: sum = 28 + 4
        assert (res["samples"], res["tokens"], res["r"]) == (16.0, 24.0, 32.0)

