"""Reward registry, weighted combination, user functions by import path (and their errors), and the
missing / non-finite reward checks."""
from __future__ import annotations

import re
import textwrap

import pytest

from megatron_gift.rewards import (RewardConfig, RewardError, RewardTermConfig, build_reward, build_rewards,
                                   load_user_function, register_reward, reward_config_from_dict, reward_names)

USER_MODULE = textwrap.dedent('''
    import math
    NOT_CALLABLE = 3

    def length_reward(prompts, responses, metadata, scale=1.0):
        return [scale * len(r) for r in responses]

    def short(prompts, responses, metadata):
        return [1.0]

    def with_nan(prompts, responses, metadata):
        return [0.0, math.nan, 1.0]

    def with_none(prompts, responses, metadata):
        return [0.0, 2.0, None]

    def with_inf(prompts, responses, metadata):
        return [-math.inf, 2.0, 1.0]

    def with_text(prompts, responses, metadata):
        return [0.0, "1", 1.0]

    def huge(prompts, responses, metadata):
        return [1e308] * len(responses)
''')

PROMPTS = ["What is 1 + 2?", "What is 20 * 3? " + "x" * 80, "What is 9 - 4?"]
RESPONSES = ["#### 3", "The answer is 61", "so \\boxed{5}"]
META = [{"answer": "3", "index": 10}, {"answer": "60", "index": 11}, {"answer": "5", "index": 12}]


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "my_rewards_mod.py"


def test_weighted_combination(user_module):
    cfg = reward_config_from_dict({"terms": [
        {"name": "math_verify", "weight": 1.0},
        {"name": "format", "weight": 0.5},
        {"name": "my_rewards_mod:length_reward", "weight": -0.1, "kwargs": {"scale": 2.0}, "label": "length"},
    ]})
    result = build_rewards(cfg).score(PROMPTS, RESPONSES, META)
    correct, formatted = [1.0, 0.0, 1.0], [1.0, 0.0, 1.0]
    length = [2.0 * len(r) for r in RESPONSES]
    assert result.terms == {"math_verify": correct, "format": formatted, "length": length}
    expected = [c + 0.5 * f - 0.1 * n for c, f, n in zip(correct, formatted, length)]
    assert result.total == pytest.approx(expected, abs=1e-12)
    assert result.replaced == {"math_verify": 0, "format": 0, "length": 0}
    assert build_rewards(cfg)(PROMPTS, RESPONSES, META) == result.total  # itself a reward function


def test_registry_errors_and_custom_registration():
    with pytest.raises(ValueError, match="unknown reward 'math_verfy'; did you mean 'math_verify'.*format"):
        build_reward("math_verfy")
    with pytest.raises(ValueError, match="reward 'format': bad kwargs \\['patern'\\]"):
        build_reward("format", {"patern": "x"})
    register_reward("constant_test", lambda value=1.0: (lambda p, r, m: [value] * len(r)))
    assert "constant_test" in reward_names()
    assert build_reward("constant_test", {"value": 2.5})(["p"], ["r"], [{}]) == [2.5]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("constant_test", lambda: None)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown key 'wieght' in reward term 0; did you mean 'weight'"):
        reward_config_from_dict({"terms": [{"name": "format", "wieght": 1}]})
    with pytest.raises(ValueError, match="unknown key 'nonfinite_penalti'.*did you mean 'nonfinite_penalty'"):
        reward_config_from_dict({"nonfinite_penalti": 0})
    with pytest.raises(ValueError, match="appears twice"):
        RewardConfig(terms=[RewardTermConfig("format"), RewardTermConfig("format")])
    with pytest.raises(ValueError, match="'weight' must be a number"):
        RewardTermConfig("format", weight="1")
    with pytest.raises(ValueError, match="'nonfinite_penalty' must be a finite number"):
        RewardConfig(nonfinite_penalty=float("nan"))
    assert [t.name for t in reward_config_from_dict({}).terms] == ["math_verify"]


def test_user_function_loading_errors(user_module):
    assert load_user_function("my_rewards_mod:length_reward")(["p"], ["abc"], [{}]) == [3.0]
    assert load_user_function(f"{user_module}:short")(["p"], ["r"], [{}]) == [1.0]  # file path form
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod_xyz'"):
        load_user_function("no_such_mod_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute 'length_rewrd'; did you mean 'length_reward'"):
        load_user_function("my_rewards_mod:length_rewrd")
    with pytest.raises(ValueError, match="'NOT_CALLABLE' is a int, not callable"):
        load_user_function("my_rewards_mod:NOT_CALLABLE")
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_user_function("my_rewards_mod.length_reward")
    with pytest.raises(ValueError, match="file not found"):
        load_user_function("/nonexistent/r.py:fn")


def test_wrong_return_length_is_an_error(user_module):
    fn = build_rewards({"terms": [{"name": "my_rewards_mod:short"}]})
    with pytest.raises(RewardError, match="reward 'my_rewards_mod:short' returned 1 values for 3 responses"):
        fn(PROMPTS, RESPONSES, META)


@pytest.mark.parametrize("name,shown,bad_index", [("with_nan", "nan", 1), ("with_none", "no value \\(None\\)", 2),
                                                  ("with_inf", "-inf", 0)])
def test_nonfinite_or_missing_reward_names_the_prompt(user_module, name, shown, bad_index):
    fn = build_rewards({"terms": [{"name": f"my_rewards_mod:{name}"}]})
    row = META[bad_index]["index"]
    with pytest.raises(RewardError, match=f"gave {shown} for response {bad_index} \\(dataset row {row}, "
                                          f"prompt \"{re.escape(PROMPTS[bad_index][:20])}"):
        fn(PROMPTS, RESPONSES, META)


def test_nonfinite_penalty_replaces_and_counts(user_module):
    fn = build_rewards({"nonfinite_penalty": -1.0, "terms": [
        {"name": "my_rewards_mod:with_nan"}, {"name": "my_rewards_mod:with_none", "weight": 2.0}]})
    result = fn.score(PROMPTS, RESPONSES, META)
    assert result.terms["my_rewards_mod:with_nan"] == [0.0, -1.0, 1.0]
    assert result.terms["my_rewards_mod:with_none"] == [0.0, 2.0, -1.0]
    assert result.total == [0.0, -1.0 + 4.0, 1.0 - 2.0]
    assert result.replaced == {"my_rewards_mod:with_nan": 1, "my_rewards_mod:with_none": 1}


def test_wrong_types_and_overflowing_sum_are_errors(user_module):
    with pytest.raises(RewardError, match="returned a str for response 1"):
        build_rewards({"nonfinite_penalty": 0.0, "terms": [{"name": "my_rewards_mod:with_text"}]})(
            PROMPTS, RESPONSES, META)
    # Finite terms whose weighted sum overflows are still caught (penalty does not hide it).
    fn = build_rewards({"nonfinite_penalty": 0.0, "terms": [{"name": "my_rewards_mod:huge", "weight": 10.0}]})
    with pytest.raises(RewardError, match="reward 'weighted sum' gave inf for response 0"):
        fn(PROMPTS, RESPONSES, META)


def test_close_stops_the_math_verify_worker_processes():
    """The trainer (and the evaluation) close the combined reward: math_verify's pool processes are gone."""
    rewards = build_rewards({"terms": [{"name": "math_verify", "kwargs": {"num_workers": 2}},
                                       {"name": "format", "weight": 0.5, "kwargs": {"pattern": "####"}}]})
    pooled = rewards.functions[0][1]
    try:
        scores = rewards(["p"] * 4, ["#### 4", "5", "#### 6", "7"], [{"answer": str(a)} for a in (4, 5, 9, 7)])
        assert scores == [1.5, 1.0, 0.5, 1.0]
        processes = list(pooled._pool._processes.values())
        assert len(processes) == 2 and all(p.is_alive() for p in processes)
    finally:
        rewards.close()
    assert pooled._pool is None and not any(p.is_alive() for p in processes)
    rewards.close()  # twice is harmless
