"""Converted checkpoints load under TP=2 and PP=2 (gloo) and give transformers' float32 logits.

One spawn per layout; every family is checked inside it. Conversion happens once, in the parent, at TP=1.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.convert_checks import tokens
from tests.tiny_hf import make_tiny_model, tiny_configs
from megatron_gift.cli.convert_hf_to_mcore import convert

pytestmark = pytest.mark.distributed
TOL = 1e-4
ORIGINALS: dict = {}
CONFIGS_TIED = {name: cfg.tie_word_embeddings for name, cfg in tiny_configs().items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (mcore_dir, ids, reference logits [b, s, V]); originals: family -> HF state dict."""
    base = tmp_path_factory.mktemp("convert_parallel")
    out = {}
    for name, cfg in tiny_configs().items():
        model = make_tiny_model(cfg)
        model.save_pretrained(base / name)
        convert(base / name, base / f"{name}_mcore", dtype="float32", quiet=True)
        ids = tokens(cfg.vocab_size, s=40)
        with torch.no_grad():
            out[name] = (str(base / f"{name}_mcore"), ids, model(ids).logits)
        ORIGINALS[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _max_diffs(rank: int, world_size: int, cases: dict) -> dict:
    """On each rank: build this stage's model, load the checkpoint, compare full logits on the last stage."""
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.mcore.convert import iter_model_as_hf, load_mcore_checkpoint
    from megatron_gift.mcore.model import build_gpt_model
    from tests.convert_checks import full_logits

    diffs, exported = {}, {}
    for name, (mcore_dir, ids, ref) in cases.items():
        arch = load_hf_arch(Path(mcore_dir))
        model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False).eval()
        load_mcore_checkpoint(model, Path(mcore_dir))
        logits = full_logits(model, ids, arch.hidden_size)
        if logits is not None:
            diffs[name] = (logits[..., : arch.vocab_size] - ref).abs().max().item()
        # The rollout weight-sync path: this stage's parameters as full HF tensors.
        exported[name] = dict(iter_model_as_hf(model, arch))
    return diffs, exported


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_logits_match_under_layout(converted, tp, pp):
    results = run_distributed(_max_diffs, world_size=2, tp=tp, pp=pp, timeout=240, cases=converted)
    diffs = results[-1][0]  # the last rank is on the last pipeline stage in both layouts
    if tp == 2:
        assert results[0][0] == results[1][0]  # both TP ranks see the same gathered logits
    for name, original in ORIGINALS.items():
        merged = {**results[0][1][name], **results[1][1][name]}  # PP: each stage exports its own part
        tied = CONFIGS_TIED[name]
        assert set(merged) == {k for k in original if not (tied and k == "lm_head.weight")}, name
        for k, t in merged.items():
            assert torch.equal(t, original[k]), (name, k)
    assert set(diffs) == set(converted)
    for name, d in sorted(diffs.items()):
        print(f"TP={tp} PP={pp} {name}: max |logit diff| = {d:.3e}")
    assert max(diffs.values()) < TOL, diffs


def _policy_stream(rank: int, world_size: int, cases: dict) -> dict:
    """The trainer's weight-sync stream (iter_policy_as_hf): what this rank's engine would receive."""
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.mcore.convert import load_mcore_checkpoint
    from megatron_gift.mcore.model import build_gpt_model
    from megatron_gift.mcore.weight_sync import iter_policy_as_hf

    streams = {}
    for name, (mcore_dir, _, _) in cases.items():
        arch = load_hf_arch(Path(mcore_dir))
        model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False)
        load_mcore_checkpoint(model, Path(mcore_dir))
        streams[name] = [(n, t.clone()) for n, t in iter_policy_as_hf([model], arch)]
    return streams


def test_every_rank_receives_the_whole_policy_at_tp2_pp2(converted):
    """TP=2 x PP=2: each of the 4 ranks gets every HF tensor, equal to the original, in one shared order."""
    results = run_distributed(_policy_stream, world_size=4, tp=2, pp=2, timeout=300, cases=converted)
    for name, original in ORIGINALS.items():
        expected = {k for k in original if not (CONFIGS_TIED[name] and k == "lm_head.weight")}
        orders = [[n for n, _ in res[name]] for res in results]
        assert all(order == orders[0] for order in orders), name
        for rank, res in enumerate(results):
            got = dict(res[name])
            assert len(got) == len(res[name]) and set(got) == expected, (name, rank)
            for k, t in got.items():
                assert torch.equal(t, original[k]), (name, rank, k)
