"""The demo arithmetic task: answers are right, files are reproducible, splits are disjoint, and the
shipped copy equals what the generator writes."""
from __future__ import annotations

import json
import os

import pytest

from megatron_gift.data import (PromptDataConfig, build_prompt_dataset, load_tokenizer, make_arithmetic_dataset,
                                make_arithmetic_tokenizer)
from megatron_gift.data.builtin import BUILTIN_ARITHMETIC, builtin_arithmetic_paths


def read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_answers_are_correct_and_splits_disjoint(tmp_path):
    paths = make_arithmetic_dataset(str(tmp_path), n_train=300, n_eval=50, seed=7)
    train, held_out = read(paths["train"]), read(paths["eval"])
    assert len(train) == 300 and len(held_out) == 50
    for row in train + held_out:
        expr = row["prompt"].removeprefix("What is ").removesuffix("?")
        value = eval(expr, {})  # independent reference: Python's own arithmetic on the prompt text
        assert row["answer"] == str(value) and value >= 0
        assert row["solution"] == f"{expr} = {value}\n#### {value}"
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert {r["prompt"].split()[3] for r in train} == {"+", "-", "*"}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_arithmetic_dataset(str(tmp_path / "a"), 40, 10, seed=1)
    b = make_arithmetic_dataset(str(tmp_path / "b"), 40, 10, seed=1)
    c = make_arithmetic_dataset(str(tmp_path / "c"), 40, 10, seed=2)
    assert open(a["train"], "rb").read() == open(b["train"], "rb").read()
    assert open(a["train"], "rb").read() != open(c["train"], "rb").read()
    with pytest.raises(ValueError, match="n_train \\+ n_eval"):
        make_arithmetic_dataset(str(tmp_path / "d"), 10_000, 0, seed=1, max_operand=5)


def test_shipped_files_equal_the_generator(tmp_path):
    shipped = builtin_arithmetic_paths()
    fresh = make_arithmetic_dataset(str(tmp_path / "ds"), **BUILTIN_ARITHMETIC)
    for split in ("train", "eval"):
        assert open(shipped[split], "rb").read() == open(fresh[split], "rb").read(), split
    fresh_tok = make_arithmetic_tokenizer(str(tmp_path / "tok"))
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert open(os.path.join(shipped["tokenizer"], name), "rb").read() == \
            open(os.path.join(fresh_tok, name), "rb").read(), name


def test_demo_data_loads_end_to_end():
    paths = builtin_arithmetic_paths()
    tok = load_tokenizer(paths["tokenizer"])
    ds = build_prompt_dataset(PromptDataConfig(path=paths["eval"], max_prompt_tokens=64), tok)
    assert len(ds) == BUILTIN_ARITHMETIC["n_eval"] and ds.stats.too_long == 0
    first = read(paths["eval"])[0]
    assert tok.decode(ds[0].prompt_ids) == f"\n{first['prompt']}\n\n"  # template markers are special tokens
    assert ds[0].answer == first["answer"]
