"""A few GIFT optimizer steps on a fixed batch (anchor `ref`, a frozen reference copy) lower the loss,
change the policy weights and leave the reference untouched; and context-parallel sequence sums are exact."""
from __future__ import annotations

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.distributed.tiny_gpt import VOCAB, _build_model, _config


def _train(rank, world_size, groups, steps, loss_options):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    policy, ref = _build_model(_config()), _build_model(_config())
    ref.load_state_dict(policy.state_dict())
    ref.requires_grad_(False)
    ref_before = {n: t.clone() for n, t in ref.state_dict().items() if isinstance(t, torch.Tensor)}
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    settings = OptimSettings(lr=3e-3, clip_grad=1.0)
    ddp = wrap_for_training([policy], settings)
    optimizer, scheduler = build_optimizer(ddp, settings)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    schedule = GiftSchedule(ddp, build_loss("gift", loss_options), ScheduleSettings(vocab_size=VOCAB), pg)
    mbs = pack_microbatches(groups, num_microbatches=2)
    schedule.fill_anchor_logprobs([ref], mbs)
    losses, tiny = [], []
    for _ in range(steps):
        result = schedule.train_step(mbs, optimizer)
        scheduler.step(1)
        values = result.values()
        losses.append(values["loss"])
        tiny.append(values["tiny_implicit_std_frac"])
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in policy.named_parameters())
    ref_moved = max(float((t - ref_before[n]).abs().max()) for n, t in ref.state_dict().items() if n in ref_before)
    return dict(losses=losses, tiny=tiny, moved=moved, ref_moved=ref_moved)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["detached", "full"])
def test_gift_steps_lower_the_loss(mode):
    out = run_distributed(_train, 1, groups=make_groups(n_groups=4, size=4, seed=3), steps=6,
                          loss_options={"grad_mode": mode})[0]
    # Step 0: policy == reference, so every group's implicit std is 0 (docs/algorithm.md, anchors), flagged.
    assert out["tiny"][0] == 1.0
    assert out["losses"][-1] < 0.7 * out["losses"][0], out["losses"]
    assert out["moved"] > 1e-3
    assert out["ref_moved"] == 0.0


def _cp_sums(rank, world_size, tokens, logits_table, mask, rewards):
    """GIFT on context-parallel slices (load-balanced 2*cp chunks) of a per-token toy "model"."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_gift.algo import GIFTConfig, GIFTLoss
    from megatron_gift.mcore.logprobs import context_parallel_reducer, vocab_parallel_logprobs
    from megatron_gift.algo.types import LossInputs

    cp_group = ps.get_context_parallel_group()
    table = logits_table.clone().requires_grad_(True)
    targets = torch.roll(tokens, -1, dims=1)
    local = get_batch_on_this_cp_rank({"tokens": tokens, "targets": targets, "mask": mask}, cp_group=cp_group)
    logp = vocab_parallel_logprobs(table[local["tokens"]], local["targets"], vocab_size=table.shape[1])
    inputs = LossInputs(mask=local["mask"], anchor_logprobs=torch.full_like(logp, -3.0), rewards=rewards,
                        group_index=torch.tensor([0, 0, 0, 1, 1, 1]), num_groups=2)
    out = GIFTLoss(GIFTConfig(grad_mode="full"))(logp, inputs, context_parallel_reducer(cp_group))
    (out.loss_sum / out.num_sequences).backward()
    grad = table.grad.clone()
    torch.distributed.all_reduce(grad, group=cp_group)  # what DDP's grad all-reduce over DP x CP does
    return dict(loss=float(out.loss_sum), grad=grad)


@pytest.mark.distributed
def test_context_parallel_sequence_sums_are_exact():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (6, 16), generator=gen)
    table = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    mask = (torch.rand(6, 16, generator=gen) > 0.3).double()
    rewards = torch.tensor([0.0, 1.0, 2.0, 1.0, 1.0, 0.0])
    kwargs = dict(tokens=tokens, logits_table=table, mask=mask, rewards=rewards)
    (single,) = run_distributed(_cp_sums, 1, **kwargs)
    results = run_distributed(_cp_sums, 2, cp=2, **kwargs)
    for r in results:
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-12)
        torch.testing.assert_close(r["grad"], single["grad"], rtol=1e-10, atol=1e-12)
    assert float(single["grad"].abs().max()) > 1e-3
