"""math_verify and format rewards: equivalent forms, GSM8K '####' answers, wrong / missing answers,
worker threads (where math-verify's signal timeout cannot run)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from math_verify import parse

from megatron_gift.rewards import FormatReward, MathVerifyReward, RewardError
from megatron_gift.rewards.math_reward import gsm8k_final

EQUIVALENT = [
    ("0.5", "1/2"),
    ("1/2", "0.5"),
    ("\\frac{1}{2}", "The answer is 0.5"),
    ("0.5", "so the result is $\\boxed{\\frac{1}{2}}$."),
    ("42", "#### 42"),
    ("#### 42", "42"),
    ("17 + 25 = 42\n#### 42", "17 + 25 = 42\n#### 42"),  # GSM8K solution as the reference
    ("42", "The answer is $\\boxed{42}$"),
    ("1234", "#### 1,234"),
    ("-3", "#### -3"),
    ("42", "#### 42.0"),
]
WRONG = [
    ("42", "#### 41"),
    ("0.5", "$\\boxed{\\frac{1}{3}}$"),
    ("17 + 25 = 42\n#### 42", "17 + 25 = 43\n#### 43"),
    ("7", "#### 42\nHmm, maybe 7"),  # the '####' line is the final answer
    ("42", "I do not know."),      # no answer at all
    ("42", ""),
]


@pytest.fixture(scope="module")
def reward():
    return MathVerifyReward()


def score(reward, gold, response):
    return reward(["prompt"], [response], [{"answer": gold}])[0]


@pytest.mark.parametrize("gold,response", EQUIVALENT)
def test_equivalent_answers_score_one(reward, gold, response):
    assert score(reward, gold, response) == 1.0


@pytest.mark.parametrize("gold,response", WRONG)
def test_wrong_or_missing_answers_score_zero(reward, gold, response):
    assert score(reward, gold, response) == 0.0


def test_custom_values_key_and_batch(reward):
    fn = MathVerifyReward(answer_key="solution", correct=2.0, incorrect=-1.0)
    out = fn(["a", "a", "b"], ["#### 3", "#### 4", "\\boxed{5}"],
             [{"solution": "3"}, {"solution": "3"}, {"solution": "#### 5"}])
    assert out == [2.0, -1.0, 2.0]


def test_missing_or_unparsable_reference_is_an_error(reward):
    with pytest.raises(RewardError, match="no 'answer' in the metadata of response 1 \\(dataset row 9, prompt \"Q2\""):
        reward(["Q1", "Q2"], ["1", "2"], [{"answer": "1"}, {"index": 9}])
    with pytest.raises(RewardError, match="cannot parse the reference answer"):
        reward(["Q1"], ["1"], [{"answer": "\\"}])
    with pytest.raises(RewardError, match="same length"):
        reward(["Q1"], ["1", "2"], [{"answer": "1"}])


def test_worker_threads_work_and_match_the_main_thread(reward):
    # The problem being handled: math-verify's default (signal) timeout refuses to run off the main thread.
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="threaded environment"):
            pool.submit(parse, "#### 42").result()
    golds = [g for g, _ in EQUIVALENT + WRONG]
    responses = [r for _, r in EQUIVALENT + WRONG]
    meta = [{"answer": g} for g in golds]
    main = reward(["p"] * len(golds), responses, meta)
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(lambda i: reward(["p"], [responses[i]], [meta[i]])[0], range(len(golds))))
    assert threaded == main == [1.0] * len(EQUIVALENT) + [0.0] * len(WRONG)


def test_only_the_tail_is_parsed():
    fn = MathVerifyReward(max_response_chars=20)
    assert fn(["p"], ["#### 42" + " filler" * 10], [{"answer": "42"}]) == [0.0]  # marker cut off
    assert fn(["p"], [" filler" * 10 + "#### 42"], [{"answer": "42"}]) == [1.0]


def test_gsm8k_final():
    assert gsm8k_final("a\n#### 1,000,000\n") == "1000000"
    assert gsm8k_final("#### 1\n#### 2") == "2"
    assert gsm8k_final("no marker") is None and gsm8k_final("####   ") is None


def test_format_reward_default_and_custom():
    fn = FormatReward()
    responses = ["work\n#### 42", "#### -1,234.5\n", "\\boxed{x+1}", "#### forty-two", "42", "#### 42 apples"]
    assert fn(["p"] * 6, responses, [{}] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    custom = FormatReward(pattern=r"^Answer: \d+$", match_value=0.5, miss_value=-0.5)
    assert custom(["p", "p"], ["x\nAnswer: 3", "Answer: three"], [{}, {}]) == [0.5, -0.5]
    with pytest.raises(ValueError, match="invalid 'pattern'"):
        FormatReward(pattern="(")


def test_process_pool_matches_in_process(reward):
    golds = [g for g, _ in EQUIVALENT + WRONG] * 2
    responses = [r for _, r in EQUIVALENT + WRONG] * 2
    meta = [{"answer": g} for g in golds]
    pooled = MathVerifyReward(num_workers=2)
    try:
        assert pooled(["p"] * len(golds), responses, meta) == reward(["p"] * len(golds), responses, meta)
        with pytest.raises(RewardError, match="cannot parse the reference answer '\\\\\\\\' of response 3"):
            pooled(["p"] * 4, ["1"] * 4, [{"answer": "1"}] * 3 + [{"answer": "\\"}])
    finally:
        pooled.close()
