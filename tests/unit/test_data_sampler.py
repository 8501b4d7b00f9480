"""The prompt sampler: permutations per epoch, exact resume (also across an epoch boundary), state checks."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from megatron_gift.data import PromptSampler, epoch_order


def test_each_epoch_is_a_permutation_and_epochs_differ():
    orders = [epoch_order(97, seed=5, epoch=e) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(97))
    assert orders[0].tolist() != orders[1].tolist() != orders[2].tolist()
    assert epoch_order(97, seed=6, epoch=0).tolist() != orders[0].tolist()
    assert epoch_order(97, seed=5, epoch=0).tolist() == orders[0].tolist()  # pure function of its inputs
    assert epoch_order(5, seed=5, epoch=0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_order_is_pinned():
    # The order is part of the resume contract: it must not move with library versions.
    assert epoch_order(10, seed=0, epoch=0).tolist() == PINNED


PINNED = [2, 5, 4, 0, 8, 9, 6, 3, 7, 1]  # recorded when the sampler was written


def test_next_batch_walks_epochs_in_order():
    items = [f"p{i}" for i in range(7)]
    sampler = PromptSampler(items, seed=1)
    drawn = sampler.next_batch(3) + sampler.next_batch(3) + sampler.next_batch(5) + sampler.next_batch(9)
    expected = [items[i] for e in range(3) for i in epoch_order(7, 1, e)][:20]
    assert drawn == expected
    assert (sampler.epoch, sampler.position, sampler.consumed) == (2, 6, 20)


@pytest.mark.parametrize("stop_after", [[2], [3, 4], [7], [6, 5, 3]])
def test_resume_gives_exactly_the_following_prompts(stop_after):
    items = list(range(7))
    reference = PromptSampler(items, seed=3)
    for n in stop_after:
        reference.next_batch(n)
    state = copy.deepcopy(reference.state_dict())
    expected = [reference.next_batch(4) for _ in range(5)]  # crosses at least two epoch boundaries

    resumed = PromptSampler(items, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(4) for _ in range(5)] == expected


def test_state_from_another_dataset_or_seed_is_refused():
    sampler = PromptSampler(list(range(7)), seed=3, fingerprint="abc")
    sampler.next_batch(5)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="num_items=7 but this run has num_items=8"):
        PromptSampler(list(range(8)), seed=3, fingerprint="abc").load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3 but this run has seed=4"):
        PromptSampler(list(range(7)), seed=4, fingerprint="abc").load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint='abc' but this run has fingerprint='xyz'"):
        PromptSampler(list(range(7)), seed=3, fingerprint="xyz").load_state_dict(state)
    with pytest.raises(ValueError, match="missing key 'seed'"):
        PromptSampler(list(range(7)), seed=3, fingerprint="abc").load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        PromptSampler(list(range(7)), seed=3, fingerprint="abc").load_state_dict({**state, "position": 9})
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], seed=0)


def test_shuffle_is_roughly_uniform():
    # Position of item 0 over many seeds should be spread over all slots (a broken hash would cluster).
    slots = np.array([epoch_order(8, seed=s, epoch=0).tolist().index(0) for s in range(4000)])
    counts = np.bincount(slots, minlength=8)
    assert counts.min() > 400 and counts.max() < 600


def test_sampler_over_a_prompt_dataset_uses_its_fingerprint(tmp_path):
    from megatron_gift.data import PromptDataConfig, build_prompt_dataset, load_tokenizer, make_arithmetic_dataset
    from megatron_gift.data import make_arithmetic_tokenizer

    paths = make_arithmetic_dataset(str(tmp_path / "ds"), 30, 0, seed=0)
    tok = load_tokenizer(make_arithmetic_tokenizer(str(tmp_path / "tok")))
    plain = build_prompt_dataset(PromptDataConfig(path=paths["train"]), tok)
    sampler = PromptSampler(plain, seed=0)
    first = sampler.next_batch(40)  # crosses into epoch 1
    assert [r.index for r in first[:30]] == epoch_order(30, 0, 0).tolist()
    state = sampler.state_dict()
    assert state["fingerprint"] == plain.fingerprint
    # Same rows with another system prompt: other token ids, so the saved position is refused.
    other = build_prompt_dataset(PromptDataConfig(path=paths["train"], system_prompt="Be brief."), tok)
    with pytest.raises(ValueError, match="fingerprint.*covers the kept rows"):
        PromptSampler(other, seed=0).load_state_dict(state)
    again = PromptSampler(build_prompt_dataset(PromptDataConfig(path=paths["train"]), tok), seed=0)
    again.load_state_dict(state)
    assert [r.index for r in again.next_batch(25)] == [r.index for r in sampler.next_batch(25)]
