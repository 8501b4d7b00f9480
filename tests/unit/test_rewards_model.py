"""Reward-model scorer against a direct transformers forward (tiny random Llama classifier, one pair at a
time, no padding), with and without the chat template, for several batch sizes."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

from megatron_gift.data import make_arithmetic_tokenizer
from megatron_gift.rewards import RewardModelScorer, build_rewards

PROMPTS = ["What is 1 + 2?", "What is 20 * 3?", "What is 9 - 4?", "Hi", "What is 11 + 11?"]
RESPONSES = ["#### 3", "The answer is 60, since 20 * 3 = 60.\n#### 60", "5", "Hello there!", "22"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    tokenizer_dir = make_arithmetic_tokenizer(str(out))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out))
    return str(out)


def direct_scores(path, texts):
    """Independent reference: each text alone through transformers, no batching, no padding."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([tok.encode(t, add_special_tokens=False)])).logits[0, 0].item() for t in texts]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_scores_equal_a_direct_forward_with_chat_template(rm_dir, batch_size):
    tok = AutoTokenizer.from_pretrained(rm_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False) for p, r in zip(PROMPTS, RESPONSES)]
    expected = direct_scores(rm_dir, texts)
    scorer = RewardModelScorer(rm_dir, batch_size=batch_size)
    got = scorer(PROMPTS, RESPONSES, [{}] * len(PROMPTS))
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 6) for x in got)) == len(got)  # a random model gives distinct scores


def test_scores_without_chat_template_and_via_config(rm_dir):
    expected = direct_scores(rm_dir, [p + r for p, r in zip(PROMPTS, RESPONSES)])
    scorer = RewardModelScorer(rm_dir, batch_size=3, use_chat_template=False)
    assert scorer(PROMPTS, RESPONSES, [{}] * 5) == pytest.approx(expected, abs=1e-5)
    combined = build_rewards({"terms": [{"name": "reward_model", "weight": 2.0,
                                         "kwargs": {"path": rm_dir, "use_chat_template": False}}]})
    assert combined(PROMPTS, RESPONSES, [{}] * 5) == pytest.approx([2 * x for x in expected], abs=1e-5)


def test_bad_options(rm_dir):
    with pytest.raises(ValueError, match="label_index 1 out of range for num_labels=1"):
        RewardModelScorer(rm_dir, label_index=1)
    with pytest.raises(ValueError, match="'dtype' is 'fp8'"):
        RewardModelScorer(rm_dir, dtype="fp8")
    with pytest.raises(ValueError, match="kwargs need 'path'"):
        build_rewards({"terms": [{"name": "reward_model"}]})
