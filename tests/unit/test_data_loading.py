"""Prompt files in every format, row checks (error names file + row + key; skip mode counts), chat template,
long-prompt filtering, and the config's own checks."""
from __future__ import annotations

import json

import datasets
import pytest

from megatron_gift.data import (PromptDataConfig, PromptDataError, build_prompt_dataset, load_tokenizer,
                                make_arithmetic_tokenizer, prompt_data_config_from_dict)

ROWS = [
    {"question": "What is 1 + 2?", "solution": "#### 3", "source": "a", "level": 1},
    {"question": "What is 10 * 3?", "solution": "30", "source": "b", "level": 2},
    {"question": "Name a prime.", "solution": "\\boxed{7}", "source": "c", "level": 3},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_arithmetic_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def config(path, **kw):
    base = dict(path=str(path), prompt_key="question", answer_key="solution", metadata_keys=["source", "level"],
                apply_chat_template=False)
    base.update(kw)
    return PromptDataConfig(**base)


def write_format(tmp_path, fmt):
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", ROWS)
    if fmt == "json":
        (tmp_path / "p.json").write_text(json.dumps(ROWS))
        return str(tmp_path / "p.json")
    ds = datasets.Dataset.from_list(ROWS)
    if fmt == "parquet":
        ds.to_parquet(str(tmp_path / "p.parquet"))
        return str(tmp_path / "p.parquet")
    if fmt == "arrow-dir":
        ds.save_to_disk(str(tmp_path / "arrow"))
        return str(tmp_path / "arrow")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    return str(tmp_path / "dd")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "arrow-dir", "datasetdict-dir"])
def test_each_format_gives_the_same_records(tmp_path, tok, fmt):
    ds = build_prompt_dataset(config(write_format(tmp_path, fmt)), tok)
    assert [r.index for r in ds] == [0, 1, 2]
    assert [r.text for r in ds] == [r["question"] for r in ROWS]
    assert [r.answer for r in ds] == [r["solution"] for r in ROWS]
    assert [r.metadata for r in ds] == [{"source": r["source"], "level": r["level"]} for r in ROWS]
    # Character-level tokenizer without BOS: ids are exactly the characters' ids.
    assert [r.prompt_ids for r in ds] == [tok.hf.convert_tokens_to_ids(list(r["question"])) for r in ROWS]
    assert ds[1].reward_metadata() == {"source": "b", "level": 2, "answer": "30", "index": 1,
                                       "prompt_text": "What is 10 * 3?"}
    assert ds.stats.rows_read == 3 and ds.stats.rows_kept == 3 and ds.stats.rows_skipped == 0


def test_explicit_format_and_split(tmp_path, tok):
    path = write_format(tmp_path, "datasetdict-dir")
    ds = build_prompt_dataset(config(path, format="arrow-dir", split="test"), tok)
    assert [r.text for r in ds] == [ROWS[0]["question"]]
    with pytest.raises(PromptDataError, match="no split 'valid'"):
        build_prompt_dataset(config(path, split="valid"), tok)


def test_chat_template_and_system_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    ds = build_prompt_dataset(config(path, apply_chat_template=True, system_prompt="Be brief."), tok)
    expected = "<|system|>\nBe brief.\n<|user|>\nWhat is 1 + 2?\n<|assistant|>\n"
    assert tok.decode(ds[0].prompt_ids, skip_special_tokens=False) == expected
    direct = tok.hf.apply_chat_template([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "What is 1 + 2?"}],
                                        tokenize=False, add_generation_prompt=True)
    assert ds[0].prompt_ids == tok.hf.encode(direct, add_special_tokens=False)
    assert ds[0].prompt_ids[0] == tok.hf.convert_tokens_to_ids("<|system|>")  # a special token, not characters


def test_chat_template_missing_is_an_error(tmp_path, tok):
    tok.hf.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            build_prompt_dataset(config(write_jsonl(tmp_path / "p.jsonl", ROWS), apply_chat_template=True), tok)
    finally:
        from megatron_gift.data.arithmetic import CHAT_TEMPLATE
        tok.hf.chat_template = CHAT_TEMPLATE


BAD_CASES = [
    ({"solution": "1", "source": "x", "level": 0}, "missing key 'question'", "missing_key"),
    ({"question": 7, "solution": "1", "source": "x", "level": 0}, "key 'question' must be a string",
     "must_be_a_string"),
    ({"question": "   ", "solution": "1", "source": "x", "level": 0}, "key 'question' is empty", "is_empty"),
    ({"question": "Q?", "source": "x", "level": 0}, "missing key 'solution'", "missing_key"),
    ({"question": "Q?", "solution": "1", "level": 0}, "missing metadata key 'source'", "missing_metadata_key"),
    ('{"question": "Q?", "solution": ', "line 3: invalid JSON row", "invalid_json"),
]


@pytest.mark.parametrize("bad,message,reason", BAD_CASES, ids=[c[2] + str(i) for i, c in enumerate(BAD_CASES)])
def test_malformed_row_error_names_file_row_and_key(tmp_path, tok, bad, message, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2] + [bad] + ROWS[2:])
    with pytest.raises(PromptDataError) as info:
        build_prompt_dataset(config(path), tok)
    text = str(info.value)
    assert path in text and message in text
    if reason != "invalid_json":
        assert "row 2:" in text  # 0-based row index of the third row


@pytest.mark.parametrize("bad,message,reason", BAD_CASES, ids=[c[2] + str(i) for i, c in enumerate(BAD_CASES)])
def test_malformed_row_skip_mode_counts(tmp_path, tok, bad, message, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS[:2] + [bad, bad] + ROWS[2:])
    ds = build_prompt_dataset(config(path, on_bad_row="skip"), tok)
    assert [r.text for r in ds] == [r["question"] for r in ROWS]
    assert ds.stats.bad_rows == {reason: 2}
    assert ds.stats.rows_read == 5 and ds.stats.rows_kept == 3


def test_missing_column_names_nearest(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(PromptDataError, match="no column 'questions'.*did you mean 'question'"):
        build_prompt_dataset(config(path, prompt_key="questions"), tok)


def test_long_prompts_are_filtered_and_counted(tmp_path, tok):
    rows = [{"question": "x" * n, "solution": "1", "source": "s", "level": 0} for n in (5, 10, 11, 30, 10)]
    ds = build_prompt_dataset(config(write_jsonl(tmp_path / "p.jsonl", rows), max_prompt_tokens=10), tok)
    assert [r.index for r in ds] == [0, 1, 4]
    assert ds.stats.too_long == 2 and ds.stats.rows_kept == 3
    with pytest.raises(ValueError, match="no usable prompts"):
        build_prompt_dataset(config(write_jsonl(tmp_path / "p.jsonl", rows), max_prompt_tokens=2), tok)


def test_max_prompts_keeps_the_first_usable_ones(tmp_path, tok):
    rows = [{"question": "x" * n, "solution": "1", "source": "s", "level": 0} for n in (5, 30, 10, 11, 7, 3)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = build_prompt_dataset(config(path, max_prompt_tokens=10, max_prompts=3), tok)
    assert [r.index for r in ds] == [0, 2, 4]  # long rows 1 and 3 are filtered before counting
    assert [r.index for r in build_prompt_dataset(config(path, max_prompt_tokens=10), tok)] == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="'max_prompts' must be an int >= 0"):
        config(path, max_prompts=-1)


def test_numbers_as_answers_become_text(tmp_path, tok):
    rows = [{"question": "Q?", "solution": 42, "source": "s", "level": 0}]
    ds = build_prompt_dataset(config(write_jsonl(tmp_path / "p.jsonl", rows)), tok)
    assert ds[0].answer == "42"


def test_missing_file_and_unknown_suffix(tmp_path, tok):
    with pytest.raises(PromptDataError, match="not found: .*nope.jsonl"):
        build_prompt_dataset(config(tmp_path / "nope.jsonl"), tok)
    (tmp_path / "p.txt").write_text("hi")
    with pytest.raises(PromptDataError, match="p.txt: cannot tell the format"):
        build_prompt_dataset(config(tmp_path / "p.txt"), tok)


def test_config_checks_and_unknown_keys():
    with pytest.raises(ValueError, match="unknown key 'promt_key'.*did you mean 'prompt_key'"):
        prompt_data_config_from_dict({"path": "a.jsonl", "promt_key": "q"})
    with pytest.raises(ValueError, match="'format' is 'csv'"):
        PromptDataConfig(path="a.csv", format="csv")
    with pytest.raises(ValueError, match="'on_bad_row'"):
        PromptDataConfig(path="a.jsonl", on_bad_row="ignore")
    with pytest.raises(ValueError, match="'max_prompt_tokens'"):
        PromptDataConfig(path="a.jsonl", max_prompt_tokens=0)
    with pytest.raises(ValueError, match="'metadata_keys' repeats"):
        PromptDataConfig(path="a.jsonl", metadata_keys=["prompt"])
    with pytest.raises(ValueError, match="'system_prompt' needs"):
        PromptDataConfig(path="a.jsonl", apply_chat_template=False, system_prompt="s")
    with pytest.raises(ValueError, match="missing required key 'path'"):
        prompt_data_config_from_dict({})
    cfg = prompt_data_config_from_dict({"path": "a.jsonl", "answer_key": None, "metadata_keys": ["id"]})
    assert cfg.answer_key is None and cfg.metadata_keys == ["id"]


def test_chat_message_prompts_and_nested_keys(tmp_path, tok):
    # verl-style rows: the prompt is a message list, the answer sits in a nested field.
    rows = [{"prompt": [{"role": "system", "content": "Sys."}, {"role": "user", "content": "What is 2 + 2?"}],
             "reward_model": {"ground_truth": "4", "style": "rule"}, "extra": {"id": 5}},
            {"prompt": [{"role": "user", "content": "What is 3 + 3?"}],
             "reward_model": {"ground_truth": "6", "style": "rule"}, "extra": {"id": 6}}]
    path = str(tmp_path / "verl.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    cfg = PromptDataConfig(path=path, answer_key="reward_model.ground_truth", metadata_keys=["extra.id"],
                           system_prompt="Default system.")
    ds = build_prompt_dataset(cfg, tok)
    assert [r.text for r in ds] == ["What is 2 + 2?", "What is 3 + 3?"]
    assert [r.answer for r in ds] == ["4", "6"] and [r.metadata for r in ds] == [{"extra.id": 5}, {"extra.id": 6}]
    # The row's own system message is kept; the configured one is only added where none is given.
    assert tok.decode(ds[0].prompt_ids, skip_special_tokens=False) == \
        "<|system|>\nSys.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n"
    assert tok.decode(ds[1].prompt_ids, skip_special_tokens=False) == \
        "<|system|>\nDefault system.\n<|user|>\nWhat is 3 + 3?\n<|assistant|>\n"
    with pytest.raises(PromptDataError, match="row 0: key 'prompt' is a chat message list, which needs"):
        build_prompt_dataset(PromptDataConfig(path=path, answer_key="reward_model.ground_truth",
                                              apply_chat_template=False), tok)
    with pytest.raises(PromptDataError, match="row 0: missing key 'reward_model.answer'"):
        build_prompt_dataset(PromptDataConfig(path=path, answer_key="reward_model.answer"), tok)


def test_bad_chat_messages_name_the_row(tmp_path, tok):
    bad = [{"prompt": [{"role": "user", "content": "ok"}], "answer": "1"},
           {"prompt": [{"role": "robot", "content": "hi"}], "answer": "1"},
           {"prompt": [{"role": "system", "content": "only system"}], "answer": "1"}]
    path = write_jsonl(tmp_path / "m.jsonl", bad)
    with pytest.raises(PromptDataError, match=r"m.jsonl: row 1: key 'prompt' message 0 must be"):
        build_prompt_dataset(PromptDataConfig(path=path), tok)
    ds = build_prompt_dataset(PromptDataConfig(path=path, on_bad_row="skip"), tok)
    assert len(ds) == 1 and ds.stats.bad_rows == {"message": 1, "is_empty": 1}


def test_non_utf8_row_names_file_and_line(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS[:2]] + ['{"question": "caf\xe9?", "solution": "1"}'.encode("latin-1")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(PromptDataError, match=f"{path}: line 3: not UTF-8 text"):
        build_prompt_dataset(config(path, metadata_keys=[]), tok)
