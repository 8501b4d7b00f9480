"""GIFT gradients of a mixture-of-experts model (tiny Qwen3-MoE and Mixtral, converted from transformers) at
EP=2, PP=2 and TP=2 x EP=2 (sequence parallel) equal the one-process run; a routing change (top-1 instead of
top-2) does not.

Each layout loads the same converted checkpoint, runs one `GiftSchedule.forward_backward` (GIFT, detached,
2 microbatches per data-parallel rank) through Megatron's DDP (expert gradients reduced over the expert
data-parallel group, the rest over DP) and returns the finalised gradients as full HF-named tensors, gathered
the way the weight sync gathers weights (TP, expert TP, EP; each pipeline stage its own part).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.tiny_hf import convert_tiny, tiny_moe_configs

pytestmark = pytest.mark.distributed
ATOL, RTOL = 2e-5, 1e-4  # the dense layout tests' tolerance (tests/distributed/test_gift_schedule.py)


@pytest.fixture(scope="module")
def mcore_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_grads")
    return convert_tiny(tiny_moe_configs(), base, seed=1)


def _uniform_microbatches(groups):
    from megatron_gift.algo.packing import pack_microbatches
    return pack_microbatches(groups, num_microbatches=2, uniform_length=True)


def _grads(rank, world_size, mcore_dirs, groups, overrides, loss_name="gift", make_mbs=_uniform_microbatches,
           dp_split=1):
    """Finalised gradients (HF names), the loss and MoE load-balancing metrics, the router coefficient after the pass.

    dp_split (one process): form the microbatches as `dp_split` data-parallel ranks would (the MoE aux loss is
    computed per microbatch, so a layout comparison needs the same microbatches)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import shard_groups
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.mcore.convert import iter_model_as_hf, load_mcore_checkpoint
    from megatron_gift.mcore.model import build_gpt_model
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    out = {}
    pg = ProcessGroupCollection.use_mpu_process_groups()
    mine = shard_groups(groups, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    for name, mcore_dir in mcore_dirs.items():
        arch = load_hf_arch(Path(mcore_dir))
        model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False, **overrides)
        load_mcore_checkpoint(model, Path(mcore_dir))
        settings = OptimSettings(lr=1e-3)
        ddp = wrap_for_training([model], settings, pg)
        build_optimizer(ddp, settings)  # installs finalize_model_grads / grad scaling hooks
        mbs = [mb for r in range(dp_split) for mb in make_mbs(shard_groups(mine, dp_split, r))]
        for mb in mbs:
            mb.loss_inputs.anchor_logprobs = mb.rollout_logprobs.clone()
        options = {"grad_mode": "detached"} if loss_name == "gift" else {"loss_agg_mode": "token-mean"}
        schedule = GiftSchedule(ddp, build_loss(loss_name, options), ScheduleSettings(vocab_size=arch.vocab_size), pg)
        metrics = schedule.forward_backward(mbs)
        grads = {n: g.clone() for n, g in iter_model_as_hf(model, arch, value=lambda p: p.main_grad)}
        aux = metrics.get("moe_load_balancing_loss")
        out[name] = dict(grads=grads, loss=metrics["loss"].clone() if "loss" in metrics else None,
                         aux=None if aux is None else float(aux[0] / aux[1]), coeff=model.config.moe_aux_loss_coeff)
    return out


def _merged(results, name):
    merged = {}
    for res in results:
        for k, g in res[name]["grads"].items():
            if k in merged:  # another DP / TP / EP rank's copy of the same full gradient: must agree
                torch.testing.assert_close(g, merged[k], atol=ATOL, rtol=RTOL)
            merged[k] = g
    return merged


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(mcore_dirs):
    groups = make_groups(n_groups=4, size=3, seed=5)
    one = run_distributed(_grads, 1, mcore_dirs=mcore_dirs, groups=groups, overrides={})
    top1 = run_distributed(_grads, 1, mcore_dirs=mcore_dirs, groups=groups, overrides={"moe_router_topk": 1, "moe_router_pre_softmax": True})
    return groups, one, top1


# world, tp, pp, ep, overrides. TP x EP needs sequence parallelism (Megatron refuses MoE training with TP and EP
# without it); on CPU the local spec's torch norms run it through the compat layer (mcore/cpu_compat.py).
LAYOUTS = {"ep2": (2, 1, 1, 2, {}), "pp2": (2, 1, 2, 1, {}), "tp2xep2_sp": (2, 2, 1, 2, {"sequence_parallel": True})}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_gift_gradients_equal_one_process(mcore_dirs, reference, layout):
    groups, one, top1 = reference
    world, tp, pp, ep, overrides = LAYOUTS[layout]
    results = run_distributed(_grads, world, tp=tp, pp=pp, ep=ep, mcore_dirs=mcore_dirs, groups=groups,
                              overrides=overrides, timeout=400)
    for name in mcore_dirs:
        ref, got, other = _merged(one, name), _merged(results, name), _merged(top1, name)
        assert any(".experts." in k for k in got) and float(ref[next(k for k in ref if ".experts.3." in k)].abs().max()) > 0
        scale = max(float(g.abs().max()) for g in ref.values())
        diff, routed = _max_diff(got, ref), _max_diff(other, ref)
        print(f"{layout} {name}: max |grad diff| {diff:.2e} (max |grad| {scale:.2e}); top-1 routing differs by {routed:.2e}")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{layout} {name} {k}: {m}")
        assert routed > 100 * ATOL  # the comparison sees a routing change
