"""Token-budget and packed microbatches against padded ones, and the anchor pass taken from the train pass.

Reference: one process, the rank's groups padded into one microbatch per count (today's path). Every
other layout (token budget of padded microbatches; packed rows with the block mask; one THD-style row)
must give the same per-sequence log-probs (1e-6) and the same finalised gradients (the layout tests'
tolerance) for GIFT (detached / full, a synthetic anchor and the self anchor) and GRPO. The self anchor
(anchor `old`, one update per rollout) must give bitwise the gradients of the separate anchor pass, with
one model forward per microbatch instead of two.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.distributed.tiny_gpt import VOCAB, _assemble_grads, _build_model, _config, _load, _rank_grads

ATOL, RTOL = 2e-5, 1e-4
CASES = {  # name -> (loss, options, self anchor, schedule mode)
    "gift_detached": ("gift", {"grad_mode": "detached"}, False, "single_pass"),
    "gift_full": ("gift", {"grad_mode": "full", "beta": 0.5}, False, "single_pass"),
    "gift_old_detached": ("gift", {"grad_mode": "detached", "anchor": "old"}, True, "single_pass"),
    "gift_old_full": ("gift", {"grad_mode": "full", "anchor": "old"}, True, "single_pass"),
    "gift_old_two_pass": ("gift", {"grad_mode": "full", "anchor": "old"}, True, "two_pass"),
    "grpo": ("grpo", {"clip_low": 0.2, "clip_high": 0.28}, False, "single_pass"),
    "grpo_old": ("grpo", {}, True, "single_pass"),
}
LAYOUTS = {  # name -> pack_microbatches keyword arguments (besides the groups)
    "padded": dict(num_microbatches=1, uniform_length=True),
    "budget": dict(max_tokens=72, pad_to_multiple=4),
    "rows": dict(max_tokens=60, packed="rows", pad_to_multiple=4),
    "thd": dict(max_tokens=80, packed="thd", pad_to_multiple=4),
}


def _step(rank: int, world_size: int, groups, layouts: List[str], weights: Optional[Dict[str, torch.Tensor]] = None,
          attention: str = "unfused"):
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches, shard_groups
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    model = _build_model(_config(), attention)
    if weights is None:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _load(model, weights)
    settings = OptimSettings(lr=1e-3)
    ddp = wrap_for_training([model], settings)
    build_optimizer(ddp, settings)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    mine = shard_groups(groups, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out: Dict[str, Any] = {"tp_rank": ps.get_tensor_model_parallel_rank(), "weights": weights}
    for layout in layouts:
        res = out[layout] = {}
        mbs = pack_microbatches(mine, **LAYOUTS[layout])
        res["num_microbatches"] = len(mbs)
        probe = GiftSchedule(ddp, build_loss("gift"), ScheduleSettings(vocab_size=VOCAB, temperature=0.7), pg)
        res["logprobs"] = _by_sequence(mbs, probe.compute_logprobs(ddp, mbs))
        for case, (loss_name, options, self_anchor, mode) in CASES.items():
            schedule = GiftSchedule(ddp, build_loss(loss_name, options), ScheduleSettings(vocab_size=VOCAB, mode=mode),
                                    pg)
            mbs = pack_microbatches(mine, **LAYOUTS[layout])
            for mb in mbs:
                mb.loss_inputs.anchor_logprobs = mb.rollout_logprobs.clone()
            if self_anchor:  # today's path: a forward-only anchor pass with the policy, then the train pass
                calls[0] = 0
                schedule.fill_anchor_logprobs(ddp, mbs)
                schedule.forward_backward(mbs)
                res[case + "/separate"] = {"grads": _rank_grads(model), "forwards": calls[0]}
                calls[0] = 0
                schedule.forward_backward(mbs, self_anchor=True)
                res[case] = {"grads": _rank_grads(model), "forwards": calls[0]}
            else:
                schedule.forward_backward(mbs)
                res[case] = {"grads": _rank_grads(model)}
    return out


def _by_sequence(mbs, logps) -> Dict[int, torch.Tensor]:
    """Response-token log-probs keyed by (group id * 1000 + index in group), whatever the layout."""
    out = {}
    for mb, lp in zip(mbs, logps):
        li = mb.loss_inputs
        for row in range(lp.shape[0]):
            gid = int(li.group_ids[row])
            k = int((li.group_ids[:row] == gid).sum())
            out[gid * 1000 + k] = lp[row][li.mask[row].bool()]
    return out


def _full(results, key):
    return _assemble_grads([{"tp_rank": r["tp_rank"], "grads": key(r)["grads"]} for r in results])


def _compare(grads, ref, what):
    biggest = max(float(g.abs().max()) for g in ref.values())
    assert biggest > 1e-3, f"{what}: reference gradient is ~0, the comparison could not fail"
    assert set(grads) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, atol=ATOL * biggest, rtol=RTOL, msg=lambda m: f"{what} {name}: {m}")


@pytest.fixture(scope="module")
def groups():
    return make_groups(n_groups=4, size=3, seed=3)


@pytest.fixture(scope="module")
def one_process(groups):
    return run_distributed(_step, 1, groups=groups, layouts=list(LAYOUTS))[0]


@pytest.fixture(scope="module")
def one_process_sdpa(groups, one_process):
    """The project's local spec (SDPA core attention; THD through Megatron's packed_seq_params path)."""
    return run_distributed(_step, 1, groups=groups, layouts=["padded", "rows", "thd"], weights=one_process["weights"],
                           attention="sdpa")[0]


def _check_against(results, reference, layout):
    ref = reference["padded"]
    for r in results:
        got = r[layout]["logprobs"]
        assert set(got) <= set(ref["logprobs"]) and got
        for k, v in got.items():
            torch.testing.assert_close(v, ref["logprobs"][k], atol=1e-6, rtol=0, msg=lambda m: f"{layout} seq {k}: {m}")
    for case in CASES:
        _compare(_full(results, lambda r: r[layout][case]), _full([reference], lambda r: r["padded"][case]),
                 f"{layout}/{case}")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["budget", "rows", "thd"])
def test_budget_and_packed_equal_padded(one_process, layout):
    assert one_process[layout]["num_microbatches"] > 1  # the budget really splits the rank's groups
    _check_against([one_process], one_process, layout)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["padded", "rows", "thd"])
def test_sdpa_attention_equals_megatron_unfused(one_process, one_process_sdpa, layout):
    """SDPA core attention (padded, masked rows, THD with per-sequence causal attention and Megatron's THD RoPE)
    against Megatron's unfused attention on padded microbatches: log-probs 1e-6, gradients as above."""
    _check_against([one_process_sdpa], one_process, layout)


@pytest.mark.distributed
@pytest.mark.parametrize("attention", ["unfused", "sdpa"])
def test_self_anchor_is_bitwise_the_anchor_pass_and_saves_a_forward(one_process, one_process_sdpa, attention):
    one_process = {"unfused": one_process, "sdpa": one_process_sdpa}[attention]
    for layout in [k for k in LAYOUTS if k in one_process]:
        n_mb = one_process[layout]["num_microbatches"]
        for case, (_, _, self_anchor, mode) in CASES.items():
            if not self_anchor:
                continue
            separate, fused = one_process[layout][case + "/separate"], one_process[layout][case]
            passes = 2 if mode == "single_pass" else 3  # two-pass: its forward-only pass is the anchor pass
            assert separate["forwards"] == passes * n_mb and fused["forwards"] == (passes - 1) * n_mb, (layout, case)
            for name, (_, g) in separate["grads"].items():
                assert torch.equal(fused["grads"][name][1], g), f"{layout}/{case} {name} not bitwise equal"
            assert max(float(g.abs().max()) for _, g in separate["grads"].values()) > 1e-3


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("sizes", [{"tp": 2}, {"pp": 2}, {}], ids=["tp2", "pp2", "dp2"])
@pytest.mark.parametrize("attention", ["unfused", "sdpa"])
def test_budget_and_packed_at_two_ranks(groups, one_process, sizes, attention):
    layouts = ["budget", "rows", "thd"] if attention == "unfused" else ["rows", "thd"]
    results = run_distributed(_step, 2, **sizes, spawn=True, groups=groups, layouts=layouts,
                              weights=one_process["weights"], attention=attention)
    for layout in layouts:
        _check_against(results, one_process, layout)


def _dropout_forwards(rank: int, world_size: int, groups):
    """With dropout the self anchor falls back to the eval-mode anchor pass: 2 forwards per microbatch."""
    import dataclasses

    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    model = _build_model(dataclasses.replace(_config(), hidden_dropout=0.1))
    settings = OptimSettings(lr=1e-3)
    ddp = wrap_for_training([model], settings)
    build_optimizer(ddp, settings)
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    schedule = GiftSchedule(ddp, build_loss("gift", {"anchor": "old"}), ScheduleSettings(vocab_size=VOCAB),
                            ProcessGroupCollection.use_mpu_process_groups())
    mbs = pack_microbatches(groups, max_tokens=72, pad_to_multiple=4)
    schedule.forward_backward(mbs, self_anchor=True)
    return calls[0], len(mbs)


@pytest.mark.distributed
def test_self_anchor_falls_back_to_the_anchor_pass_with_dropout(groups):
    forwards, n_mb = run_distributed(_dropout_forwards, 1, groups=groups)[0]
    assert n_mb > 1 and forwards == 2 * n_mb
