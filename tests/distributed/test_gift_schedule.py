"""The GIFT schedule over Megatron's pipeline schedules: gradient invariance under TP / PP / DP and the
microbatch count, single-pass == two-pass, anchor log-probs equal a direct forward.

One single-process run (whole batch in one microbatch) is the reference; each layout loads the same
weights (helpers of the smoke test), runs `GiftSchedule.forward_backward` for GIFT (both gradient modes)
and GRPO, and returns the finalised gradients, which are assembled to full tensors and compared. GRPO / DAPO with
`token-mean` divide by the global number of response tokens: layouts that split tokens unevenly over
ranks and microbatches must still give the one-process gradient.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch

from megatron_gift.algo.packing import RolloutGroup
from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.tiny_gpt import VOCAB, _assemble_grads, _build_model, _config, _load, _rank_grads

ATOL, RTOL = 2e-5, 1e-4
CASES = {  # name -> (loss, options, schedule mode)
    "gift_detached": ("gift", {"grad_mode": "detached"}, "single_pass"),
    "gift_full": ("gift", {"grad_mode": "full", "beta": 0.5}, "single_pass"),
    "gift_two_pass": ("gift", {"grad_mode": "full", "beta": 0.5}, "two_pass"),
    "grpo": ("grpo", {"clip_low": 0.2, "clip_high": 0.28}, "single_pass"),  # token-mean: global token count
    "grpo_seq_mean": ("grpo", {"loss_agg_mode": "seq-mean-token-mean"}, "single_pass"),
    "dapo": ("dapo", {}, "single_pass"),
    "gspo": ("gspo", {"clip_low": 0.2, "clip_high": 0.28}, "single_pass"),
    "grpo_kl": ("grpo", {"kl_coef": 0.05}, "single_pass"),
}


def make_groups(n_groups=4, size=3, seed=0) -> List[RolloutGroup]:
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(3, 6, (1,), generator=gen)),), generator=gen)
        responses = [torch.randint(0, VOCAB, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen)
                     for _ in range(size)]
        # The "rollout" log-probs double as synthetic anchor log-probs, so h has a real spread.
        groups.append(RolloutGroup(group_id=g, prompt=prompt, responses=responses,
                                   rewards=torch.randint(0, 3, (size,), generator=gen).float(),
                                   rollout_logprobs=[-4.0 - torch.rand(r.numel(), generator=gen) for r in responses]))
    return groups


def _step(rank: int, world_size: int, groups, num_microbatches: int, cases: List[str],
          weights: Optional[Dict[str, torch.Tensor]] = None, config_extra: Optional[dict] = None) -> Dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches, shard_groups
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    model = _build_model(_config(**(config_extra or {})))
    reference = weights is None
    if reference:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        _load(model, weights)
    settings = OptimSettings(lr=1e-3)
    ddp = wrap_for_training([model], settings)
    build_optimizer(ddp, settings)  # installs finalize_model_grads / grad scaling hooks
    pg = ProcessGroupCollection.use_mpu_process_groups()
    mine = shard_groups(groups, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    out: Dict[str, Any] = {"tp_rank": ps.get_tensor_model_parallel_rank(), "weights": weights if reference else None}
    for case in cases:
        loss_name, options, mode = CASES[case]
        mbs = pack_microbatches(mine, num_microbatches=num_microbatches, uniform_length=True)
        for mb in mbs:
            mb.loss_inputs.anchor_logprobs = mb.rollout_logprobs.clone()
            mb.loss_inputs.ref_logprobs = (mb.rollout_logprobs - 0.3) * mb.loss_inputs.mask
        schedule = GiftSchedule(ddp, build_loss(loss_name, options), ScheduleSettings(vocab_size=VOCAB, mode=mode), pg)
        metrics = schedule.forward_backward(mbs)
        out[case] = {"grads": _rank_grads(model),
                     "loss": metrics["loss"].clone() if "loss" in metrics else None}
    logps = GiftSchedule(ddp, build_loss("gift"), ScheduleSettings(vocab_size=VOCAB, temperature=0.7), pg) \
        .compute_logprobs(ddp, pack_microbatches(mine, num_microbatches=num_microbatches, uniform_length=True))
    out["logprobs"] = torch.cat([lp.reshape(-1) for lp in logps])
    if reference:
        out["direct_logprobs"] = _direct_logprobs(model, mine, temperature=0.7)
    return out


def _direct_logprobs(model, groups, temperature: float) -> torch.Tensor:
    """Plain log_softmax of the model's logits over the (unpadded) vocabulary, for the single-process model."""
    from megatron_gift.algo.packing import pack_microbatches
    (mb,) = pack_microbatches(groups, num_microbatches=1, uniform_length=True)
    with torch.no_grad():
        logits = model(mb.tokens, mb.position_ids, None)
    logp = torch.log_softmax(logits.double() / temperature, dim=-1).gather(-1, mb.targets[..., None])[..., 0]
    return logp.float()


@pytest.fixture(scope="module")
def groups():
    return make_groups()


@pytest.fixture(scope="module")
def reference(groups):
    return run_distributed(_step, 1, groups=groups, num_microbatches=1, cases=list(CASES))[0]


def _compare(results, reference, case):
    grads = _assemble_grads([{"tp_rank": r["tp_rank"], "grads": r[case]["grads"]} for r in results])
    ref = {n: g for n, (_, g) in reference[case]["grads"].items()}
    assert set(grads) == set(ref)
    biggest = max(float(g.abs().max()) for g in ref.values())
    assert biggest > 1e-3, f"{case}: reference gradient is ~0, the comparison could not fail"
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, atol=ATOL * biggest, rtol=RTOL, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.distributed
def test_anchor_logprobs_equal_direct_forward(reference):
    torch.testing.assert_close(reference["logprobs"], reference["direct_logprobs"].reshape(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
def test_single_pass_equals_two_pass(reference):
    _compare([reference], reference, "gift_full")
    ref_full = {n: g for n, (_, g) in reference["gift_full"]["grads"].items()}
    for name, (_, g) in reference["gift_two_pass"]["grads"].items():
        torch.testing.assert_close(g, ref_full[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


LAYOUTS = {  # name -> (world size, parallel sizes, microbatches per rank[, TransformerConfig extras])
    "mb4": (1, {}, 4),
    "dp2": (2, {}, 2),
    "tp2": (2, {"tp": 2}, 1),
    "tp2_sp": (2, {"tp": 2}, 2, {"sequence_parallel": True}),  # norms' grads summed over TP (cpu_compat tags them)
    "pp2": (2, {"pp": 2}, 2),
    "tp2_pp2": (4, {"tp": 2, "pp": 2}, 4),
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gradients_match_single_process(layout, groups, reference):
    world, sizes, n_mb, *extra = LAYOUTS[layout]
    results = run_distributed(_step, world, **sizes, spawn=True, groups=groups, num_microbatches=n_mb,
                              cases=list(CASES), weights=reference["weights"], config_extra=extra[0] if extra else None)
    for case in CASES:
        _compare(results, reference, case)
    for r in results:  # every rank (PP stages, TP, DP) sees the same anchor log-probs of its share
        assert torch.isfinite(r["logprobs"]).all()
