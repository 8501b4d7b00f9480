"""HF -> Megatron -> HF round trip: identical tensors, transformers loads the export with the same greedy
output; CLI behaviour (overwrite refusal, atomic output) and every error case names what is wrong."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.tiny_hf import make_tiny_model, tiny_configs
from megatron_gift.cli.convert_hf_to_mcore import convert
from megatron_gift.cli.convert_mcore_to_hf import export

REPO = Path(__file__).resolve().parents[2]
CONFIGS = tiny_configs()


def _hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, cfg in CONFIGS.items():
        make_tiny_model(cfg).save_pretrained(base / name)
        (base / name / "tokenizer.json").write_text('{"fake": "tokenizer"}')  # side files must travel
        dirs[name] = base / name
    return dirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_roundtrip_identical_and_loadable(hf_dirs, tmp_path, name):
    src = hf_dirs[name]
    info = convert(src, tmp_path / "mcore", dtype="float32", quiet=True)
    assert info["padded_vocab_size"] == 256 and info["model_type"] == CONFIGS[name].model_type
    assert (tmp_path / "mcore" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    summary = export(tmp_path / "mcore", tmp_path / "hf", max_shard_bytes=100_000, quiet=True)
    out = tmp_path / "hf"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    a, b = _hf_tensors(src), _hf_tensors(out)
    assert set(a) == set(b) and summary["tensors"] == len(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 99, 3, 150, 42]])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), new.generate(ids, **kw))


def test_bfloat16_conversion(hf_dirs, tmp_path):
    convert(hf_dirs["qwen2_bias_tied"], tmp_path / "mcore", dtype="bfloat16", quiet=True)
    export(tmp_path / "mcore", tmp_path / "hf", quiet=True)
    a, b = _hf_tensors(hf_dirs["qwen2_bias_tied"]), _hf_tensors(tmp_path / "hf")
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *args, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_refuses_overwrite_and_replaces_only_with_flag(hf_dirs, tmp_path):
    out = tmp_path / "mcore"
    ok = _cli("convert_hf_to_mcore.py", "--hf-dir", str(hf_dirs["mistral_untied"]), "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    again = _cli("convert_hf_to_mcore.py", "--hf-dir", str(hf_dirs["llama2_tied"]), "--out", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert json.loads((out / "megatron_gift_conversion.json").read_text())["model_type"] == "mistral"
    forced = _cli("convert_hf_to_mcore.py", "--hf-dir", str(hf_dirs["llama2_tied"]), "--out", str(out), "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "megatron_gift_conversion.json").read_text())["model_type"] == "llama"
    back = _cli("convert_mcore_to_hf.py", "--mcore-dir", str(out), "--out", str(tmp_path / "hf"))
    assert back.returncode == 0, back.stderr
    assert set(_hf_tensors(tmp_path / "hf")) == set(_hf_tensors(hf_dirs["llama2_tied"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mcore"]  # no temp dirs left behind


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_failed_conversion_leaves_no_output_and_keeps_old(hf_dirs, tmp_path):
    bad = _broken_copy(hf_dirs["llama2_tied"], tmp_path / "bad")
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*\(64, 95\)"):
        convert(bad, tmp_path / "new", quiet=True)
    assert not (tmp_path / "new").exists()
    convert(hf_dirs["llama2_tied"], tmp_path / "old", quiet=True)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "old").rglob("*"))
    with pytest.raises(ValueError, match="down_proj"):
        convert(bad, tmp_path / "old", overwrite=True, quiet=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "old").rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_error_cases_name_the_problem(hf_dirs, tmp_path):
    src = hf_dirs["qwen3_headdim_untied"]
    # Unsupported architecture: the supported list is in the message.
    arch = _broken_copy(src, tmp_path / "gpt2")
    cfg = json.loads((arch / "config.json").read_text())
    (arch / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3"):
        convert(arch, tmp_path / "o1", quiet=True)
    # Missing weights / truncated file / missing config.
    missing = _broken_copy(src, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        convert(missing, tmp_path / "o2", quiet=True)
    trunc = _broken_copy(src, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc/model.safetensors.*truncated"):
        convert(trunc, tmp_path / "o3", quiet=True)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert(tmp_path / "nowhere", tmp_path / "o4", quiet=True)
    # Weights of another model under this config.
    other = _broken_copy(src, tmp_path / "other")
    shutil.copy2(hf_dirs["mistral_untied"] / "model.safetensors", other / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_norm|shape"):
        convert(other, tmp_path / "o5", quiet=True)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_export_errors_name_the_problem(hf_dirs, tmp_path):
    convert(hf_dirs["mistral_untied"], tmp_path / "mcore", quiet=True)
    with pytest.raises(ValueError, match="megatron_gift_conversion.json: missing"):
        export(hf_dirs["mistral_untied"], tmp_path / "x1", quiet=True)
    # A converted checkpoint whose config.json belongs to another model (Qwen3 has q/k norms).
    wrong = _broken_copy(tmp_path / "mcore", tmp_path / "wrong")
    shutil.copy2(hf_dirs["qwen3_headdim_untied"] / "config.json", wrong / "config.json")
    with pytest.raises(ValueError, match=r"q_layernorm|shape"):
        export(wrong, tmp_path / "x2", quiet=True)
    with pytest.raises(ValueError, match="has no tensor 'model.embedding"):
        export(tmp_path / "mcore", tmp_path / "x3", key_prefix="model.", quiet=True)
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 4))
