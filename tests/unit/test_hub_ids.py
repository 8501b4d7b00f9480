"""Hub ids for model.hf_dir, the converter's --hf-dir and data.path, resolved from a local cache laid out the way
huggingface_hub lays it out (no hub is reachable): models--org--name/{refs/main, snapshots/<rev>/...} under a
temporary HF_HOME, HF_HUB_OFFLINE=1. Plain directories keep working; a missing id is a one-line error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_gift.data import PromptDataConfig, PromptDataError
from megatron_gift.data.loading import LoadStats, load_rows
from megatron_gift.hf.hub import hub_cache_dir, is_hub_id, resolve_model_dir

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": "What is 2 * 5?", "answer": "10"}]


def cached_repo(hf_home: Path, repo_type: str, repo_id: str, files: dict, revision: str = "0" * 40,
                main: bool = True) -> Path:
    """Write files into HF_HOME/hub/<type>s--org--name/snapshots/<revision>/ and point refs/main at it."""
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    for name, text in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return home


def test_model_id_resolves_to_the_snapshot_refs_main_names(hf_home):
    cached_repo(hf_home, "model", "org/tiny", {"config.json": "{}"}, revision="a" * 40, main=False)  # an older one
    snap = cached_repo(hf_home, "model", "org/tiny", {"config.json": "{}"}, revision="b" * 40)
    assert hub_cache_dir() == str(hf_home / "hub")
    assert resolve_model_dir("org/tiny") == str(snap)


def test_directories_and_non_ids_are_left_alone(hf_home, tmp_path):
    (tmp_path / "org" / "tiny").mkdir(parents=True)  # a relative directory that looks like an id wins
    assert not is_hub_id("org/tiny")
    assert resolve_model_dir("org/tiny") == "org/tiny"
    for value in ("", "/abs/dir", "./org/x", "../org/x", "a/b/c", "~/x"):
        assert resolve_model_dir(value) == value


def test_missing_id_offline_is_a_one_line_error(hf_home):
    with pytest.raises(ValueError) as err:
        resolve_model_dir("Qwen/Qwen3-8B")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.hf_dir: 'Qwen/Qwen3-8B'")
    assert "not in the cache" in msg and "HF_HUB_OFFLINE is set" in msg and str(hf_home / "hub") in msg


def test_run_config_resolves_model_hf_dir(hf_home):
    from megatron_gift.config.run import load_run_config

    snap = cached_repo(hf_home, "model", "org/tiny", {"config.json": "{}"})
    cfg = load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["model.hf_dir=org/tiny"])
    assert cfg.model.hf_dir == str(snap)
    with pytest.raises(ValueError, match="model.hf_dir: 'org/absent' .*not in the cache"):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["model.hf_dir=org/absent"])


def test_dataset_id_loads_through_datasets_from_the_cache(hf_home):
    cached_repo(hf_home, "dataset", "org/arith", {
        "data/train.jsonl": "".join(json.dumps(r) + "\n" for r in ROWS),
        "data/test.jsonl": json.dumps(ROWS[0]) + "\n"})
    rows = load_rows(PromptDataConfig(path="org/arith", apply_chat_template=False), LoadStats())
    assert [dict(r) for r in rows] == ROWS
    test = load_rows(PromptDataConfig(path="org/arith", split="test", apply_chat_template=False), LoadStats())
    assert [dict(r) for r in test] == ROWS[:1]
    with pytest.raises(PromptDataError, match="not in the cache .*HF_HUB_OFFLINE is set"):
        load_rows(PromptDataConfig(path="org/absent", apply_chat_template=False), LoadStats())
    with pytest.raises(PromptDataError, match="prompt data file not found: data/train.jsonl"):
        load_rows(PromptDataConfig(path="data/train.jsonl", apply_chat_template=False), LoadStats())


def test_converter_cli_takes_a_model_id(hf_home, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from megatron_gift.cli.convert_hf_to_mcore import main
    from tests.tiny_hf import make_tiny_model, tiny_configs

    assert main(["--hf-dir", "org/absent", "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert "--hf-dir: 'org/absent' is not a directory" in capsys.readouterr().err
    snap = cached_repo(hf_home, "model", "org/tiny", {})
    model = make_tiny_model(tiny_configs()["llama2_tied"])
    model.save_pretrained(snap)
    assert main(["--hf-dir", "org/tiny", "--out", str(tmp_path / "mcore"), "--dtype", "float32", "--quiet"]) == 0
    info = json.loads((tmp_path / "mcore" / "megatron_gift_conversion.json").read_text())
    assert info["source"] == str(snap) and info["model_type"] == "llama"
    original = load_file(str(snap / "model.safetensors"))
    assert set(original) and all(t.dtype == torch.float32 for t in original.values())
