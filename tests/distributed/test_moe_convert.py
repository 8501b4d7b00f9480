"""Mixture-of-experts (Qwen3-MoE, Mixtral): converted checkpoints give transformers' float32 logits at
EP=1, EP=2, TP=2 x EP=2, PP=2 and expert-TP=2 (gloo), and the weight-sync stream gathers every expert.

Conversion happens once, in the parent, at TP=EP=1; each layout loads it through dist_checkpointing (which
shards the experts by EP / ETP) and exports it back through iter_model_as_hf (the trainer's weight sync).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gift.cli.convert_hf_to_mcore import convert
from megatron_gift.mcore.testing.harness import run_distributed
from tests.convert_checks import tokens
from tests.tiny_hf import make_tiny_model, tiny_moe_configs

pytestmark = pytest.mark.distributed
TOL = 1e-4
ORIGINALS: dict = {}
TIED = {name: cfg.tie_word_embeddings for name, cfg in tiny_moe_configs().items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (mcore_dir, ids, reference logits [b, s, V]); ORIGINALS: family -> HF state dict (disk names)."""
    base = tmp_path_factory.mktemp("moe_convert")
    out = {}
    for name, cfg in tiny_moe_configs().items():
        model = make_tiny_model(cfg)
        model.save_pretrained(base / name)
        convert(base / name, base / f"{name}_mcore", dtype="float32", quiet=True)
        ids = tokens(cfg.vocab_size, s=40)
        with torch.no_grad():
            out[name] = (str(base / f"{name}_mcore"), ids, model(ids).logits)
        from safetensors.torch import load_file
        ORIGINALS[name] = load_file(str(base / name / "model.safetensors"))  # per-expert names, as on disk
    return out


def _logits_and_export(rank: int, world_size: int, cases: dict, overrides: dict):
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.mcore.convert import iter_model_as_hf, load_mcore_checkpoint
    from megatron_gift.mcore.model import build_gpt_model
    from tests.convert_checks import full_logits

    diffs, exported = {}, {}
    for name, (mcore_dir, ids, ref) in cases.items():
        arch = load_hf_arch(Path(mcore_dir))
        model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False, **overrides).eval()
        load_mcore_checkpoint(model, Path(mcore_dir))
        logits = full_logits(model, ids, arch.hidden_size)
        if logits is not None:
            diffs[name] = (logits[..., : arch.vocab_size] - ref).abs().max().item()
        exported[name] = dict(iter_model_as_hf(model, arch))
    return diffs, exported


LAYOUTS = {  # id -> (world, tp, pp, ep, etp[, TransformerConfig overrides])
    "ep1": (1, 1, 1, 1, 1),
    "ep2": (2, 1, 1, 2, 1),
    # The GPU default dispatcher: Megatron's all_to_all_single with uneven splits also runs on gloo.
    "ep2_allgather": (2, 1, 1, 2, 1, {"moe_token_dispatcher_type": "allgather"}),
    "pp2": (2, 1, 2, 1, 1),
    "tp2_etp2": (2, 2, 1, 1, 2),
    "tp2_ep2": (4, 2, 1, 2, 1),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_logits_and_export_under_layout(converted, layout):
    world, tp, pp, ep, etp, *overrides = LAYOUTS[layout]
    results = run_distributed(_logits_and_export, world_size=world, tp=tp, pp=pp, ep=ep, etp=etp, timeout=300,
                              cases=converted, overrides=overrides[0] if overrides else {})
    diffs = results[-1][0]  # the last rank is on the last pipeline stage
    assert set(diffs) == set(converted)
    for name, original in ORIGINALS.items():
        expected = {k for k in original if not (TIED[name] and k == "lm_head.weight")}
        stages = [results[0][1][name]] + ([results[-1][1][name]] if pp > 1 else [])
        merged = {k: v for stage in stages for k, v in stage.items()}
        assert set(merged) == expected, (name, sorted(set(merged) ^ expected)[:4])
        for k, t in merged.items():
            assert torch.equal(t, original[k]), (layout, name, k)
        if pp == 1:  # every rank of the stage holds every expert after the gather
            for res in results:
                assert set(res[1][name]) == expected
    for name, d in sorted(diffs.items()):
        print(f"{layout} (world {world}, TP={tp} PP={pp} EP={ep} ETP={etp}) {name}: max |logit diff| = {d:.3e}")
    assert max(diffs.values()) < TOL, diffs
