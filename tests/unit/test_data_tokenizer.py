"""Tokenizers behind one interface: a sentencepiece model trained here, the HF directory loader, and the
demo arithmetic tokenizer (round trip, chat template, EOS)."""
from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from megatron_gift.data import (HFTokenizer, PromptDataConfig, SentencePieceTokenizer, build_prompt_dataset,
                                load_tokenizer, make_arithmetic_tokenizer)
from megatron_gift.data.arithmetic import SPECIAL_TOKENS


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    words = ["what", "is", "the", "sum", "of", "and", "answer", "number", "plus", "times", "minus"]
    lines = [" ".join(rng.choice(words) for _ in range(8)) + f" {rng.randint(0, 999)}" for _ in range(300)]
    (out / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(out / "corpus.txt"), model_prefix=str(out / "m"), vocab_size=64,
                                   model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=3,
                                   minloglevel=2)
    return str(out / "m.model")


def test_sentencepiece_wrapper_matches_the_library(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    text = "what is the sum of 12 and 30"
    assert tok.encode(text) == [1] + ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text)
    assert tok.decode(tok.encode(text) + [2]) == text
    assert (tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (2, 3, 64)
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_sentencepiece_prompt_dataset(tmp_path, sp_model):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"what is {i} plus {i}", "answer": str(2 * i)})
                              for i in range(4)))
    tok = load_tokenizer(sp_model)
    ds = build_prompt_dataset(PromptDataConfig(path=str(path), apply_chat_template=False), tok)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    assert [r.prompt_ids for r in ds] == [[1] + ref.encode(f"what is {i} plus {i}") for i in range(4)]
    with pytest.raises(ValueError, match="'apply_chat_template' is true but tokenizer .* no chat template"):
        build_prompt_dataset(PromptDataConfig(path=str(path)), tok)


def test_arithmetic_tokenizer_round_trip(tmp_path):
    path = make_arithmetic_tokenizer(str(tmp_path / "tok"))
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    direct = AutoTokenizer.from_pretrained(path)
    text = "What is 17 + 25?\nStep: 17 + 25 = 42\n#### 42 (done!)"
    ids = tok.encode(text)
    assert ids == direct.encode(text) and len(ids) == len(text)  # one token per character, no BOS
    assert tok.decode(ids) == text
    assert tok.eos_token_id == SPECIAL_TOKENS.index("</s>") and tok.pad_token_id == SPECIAL_TOKENS.index("<pad>")
    assert tok.vocab_size < 128  # fits the tiny demo model's vocabulary
    # EOS is one token and is dropped when decoding without specials.
    assert tok.encode("12</s>") == tok.encode("12") + [tok.eos_token_id]
    assert tok.decode(tok.encode("12</s>")) == "12"
    chat = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "#### 3"}]
    rendered = direct.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|user|>\nWhat is 1 + 2?\n<|assistant|>\n#### 3</s>\n"
    assert tok.render_chat(chat[:1]) == "<|user|>\nWhat is 1 + 2?\n<|assistant|>\n"
    assert tok.encode("é") == [SPECIAL_TOKENS.index("<unk>")]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
