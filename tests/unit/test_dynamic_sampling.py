"""Dynamic sampling: zero-variance groups are dropped and the batch refilled from new prompts; the cap
stops it (fill or error); the config parses from the run config with nearest-key errors."""
import pytest
import torch

from megatron_gift.algo.packing import RolloutGroup
from megatron_gift.config.schema import TrainerConfig, apply_overrides
from megatron_gift.rollout.dynamic_sampling import (DynamicSamplingCapError, DynamicSamplingConfig, collect_groups,
                                                    gather_round, has_reward_variance)
from megatron_gift.utils.dataclass_dict import from_dict


class FakeRounds:
    """Round r: `n` groups of prompt ids 100 * r + p; `flat(r, p)` decides whether all rewards are equal."""

    def __init__(self, n, flat):
        self.n, self.flat, self.calls = n, flat, []

    def __call__(self, r):
        self.calls.append(r)
        out = []
        for p in range(self.n):
            rewards = torch.ones(3) if self.flat(r, p) else torch.tensor([0.0, 1.0, 0.0])
            out.append(RolloutGroup(group_id=p, prompt=torch.tensor([100 * r + p]),
                                    responses=[torch.tensor([1])] * 3, rewards=rewards))
        return out


def prompts(batch):
    return [int(g.prompt[0]) for g in batch]


def test_zero_variance_groups_are_refilled_from_new_prompts():
    rounds = FakeRounds(4, flat=lambda r, p: p % 2 == 0)  # half of every round has no variance
    batch, m = collect_groups(rounds, 4, DynamicSamplingConfig(enabled=True))
    assert rounds.calls == [0, 1]
    assert prompts(batch) == [1, 3, 101, 103] and [g.group_id for g in batch] == [0, 1, 2, 3]
    assert all(has_reward_variance(g) for g in batch)
    assert m == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/kept_frac": 0.5, "dynamic_sampling/filled": 0.0}


def test_a_full_first_round_takes_one_round_and_extra_groups_are_cut():
    rounds = FakeRounds(4, flat=lambda r, p: r == 0 and p == 0)
    batch, m = collect_groups(rounds, 4, DynamicSamplingConfig(enabled=True))
    assert prompts(batch) == [1, 2, 3, 100] and m["dynamic_sampling/rounds"] == 2
    rounds = FakeRounds(4, flat=lambda r, p: False)
    batch, m = collect_groups(rounds, 4, DynamicSamplingConfig(enabled=True))
    assert rounds.calls == [0] and prompts(batch) == [0, 1, 2, 3]


def test_the_cap_stops_the_refill():
    rounds = FakeRounds(4, flat=lambda r, p: p != 0)  # one useful group per round
    batch, m = collect_groups(rounds, 4, DynamicSamplingConfig(enabled=True, max_rounds=3))
    assert rounds.calls == [0, 1, 2]
    assert prompts(batch) == [0, 100, 200, 1]  # topped up with the first dropped group
    assert m["dynamic_sampling/filled"] == 1.0 and m["dynamic_sampling/rounds"] == 3.0
    with pytest.raises(DynamicSamplingCapError, match="max_rounds=2"):
        collect_groups(FakeRounds(4, flat=lambda r, p: p != 0), 4, DynamicSamplingConfig(enabled=True, max_rounds=2,
                                                                                          on_cap="error"))


def test_gather_round_checks_the_ids_in_one_process():
    groups = FakeRounds(3, flat=lambda r, p: False)(0)
    assert [g.group_id for g in gather_round(groups[::-1], 3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="expected the groups 0..3"):
        gather_round(groups, 4)


def test_config_from_the_run_config():
    data = apply_overrides({"trainer": {}}, ["trainer.dynamic_sampling.enabled=true",
                                            "trainer.dynamic_sampling.max_rounds=4"])
    cfg = from_dict(TrainerConfig, data["trainer"], "trainer")
    assert cfg.dynamic_sampling == DynamicSamplingConfig(enabled=True, max_rounds=4)
    with pytest.raises(ValueError, match="unknown key 'max_round'.*did you mean 'max_rounds'"):
        from_dict(TrainerConfig, {"dynamic_sampling": {"max_round": 3}}, "trainer")
    with pytest.raises(ValueError, match="on_cap"):
        DynamicSamplingConfig(on_cap="drop")
    with pytest.raises(ValueError, match="responses_per_prompt >= 2"):
        from_dict(TrainerConfig, {"responses_per_prompt": 1, "dynamic_sampling": {"enabled": True}}, "trainer")
