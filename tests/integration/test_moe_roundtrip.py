"""MoE HF -> Megatron -> HF round trip through the converter CLIs' functions: identical tensors (every expert
under its HF name), and transformers loads the export and computes the same logits."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_gift.cli.convert_hf_to_mcore import convert
from megatron_gift.cli.convert_mcore_to_hf import export
from tests.tiny_hf import make_tiny_model, tiny_moe_configs

CONFIGS = tiny_moe_configs()


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_moe_roundtrip_identical_and_loadable(tmp_path, name):
    make_tiny_model(CONFIGS[name]).save_pretrained(tmp_path / "src")
    info = convert(tmp_path / "src", tmp_path / "mcore", dtype="float32", quiet=True)
    assert info["model_type"] == CONFIGS[name].model_type
    export(tmp_path / "mcore", tmp_path / "hf", max_shard_bytes=200_000, quiet=True)
    a, b = _tensors(tmp_path / "src"), _tensors(tmp_path / "hf")
    assert set(a) == set(b) and any(".experts.3." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 99, 3, 150, 42, 7, 8]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, new(ids).logits)
