"""DAPO's overlong reward shaping: the soft penalty over the last L tokens, as a combined reward term."""
import pytest

from megatron_gift.rewards import RewardError, build_rewards
from megatron_gift.rewards.overlong import OverlongPenalty


class Record:
    def __init__(self, text):
        self.text = text

    def reward_metadata(self):
        return {"index": 0}


def reference(length, max_len, buffer, factor):
    """DAPO eq. 13 written out case by case."""
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return ((max_len - buffer) - length) / buffer * factor
    return -factor * (length - (max_len - buffer)) / buffer  # beyond the limit (cannot happen with truncation)


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_penalty_matches_the_paper(factor):
    pen = OverlongPenalty(max_response_tokens=20, buffer_tokens=8, penalty_factor=factor)
    for length in range(0, 23):
        assert pen.penalty(length) == pytest.approx(reference(length, 20, 8, factor), abs=1e-15)
    assert pen.penalty(12) == 0.0 and pen.penalty(20) == -factor and pen.penalty(16) == pytest.approx(-factor / 2)


def test_as_a_combined_term_reading_the_lengths():
    rewards = build_rewards({"terms": [{"name": "format", "kwargs": {"pattern": "x"}},
                                       {"name": "overlong", "weight": 1.0,
                                        "kwargs": {"max_response_tokens": 10, "buffer_tokens": 4}}]})
    result = rewards.score_records([Record("p")] * 3, ["x", "x", "y"], response_lengths=[5, 8, 10])
    assert result.terms["overlong"] == [0.0, -0.5, -1.0]
    assert result.total == [1.0, 0.5, -1.0]
    with pytest.raises(RewardError, match="metadata key 'response_tokens'"):
        rewards.score_records([Record("p")], ["x"])


def test_bad_kwargs_name_the_key():
    with pytest.raises(ValueError, match="'buffer_tokens'"):
        build_rewards({"terms": [{"name": "overlong", "kwargs": {"max_response_tokens": 4, "buffer_tokens": 8}}]})
    with pytest.raises(ValueError, match="max_response_tokens"):
        build_rewards({"terms": [{"name": "overlong", "kwargs": {"buffer_tokens": 8}}]})
