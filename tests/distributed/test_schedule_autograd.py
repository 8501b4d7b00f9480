"""GiftSchedule's gradients equal plain PyTorch autograd of the same loss on the same model: logits from
the model's forward, torch.log_softmax over the true vocabulary, GIFTLoss, .backward(). An independent
path (no vocab-parallel function, no Megatron schedule, no loss-scaling contract)."""
import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups
from tests.distributed.tiny_gpt import VOCAB, _build_model, _config


def schedule_vs_autograd(rank, world_size, device="cpu"):
    """Max relative gradient difference between the schedule and plain autograd (both GIFT modes, GRPO)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    model = _build_model(_config()).to(device)
    settings = OptimSettings()
    ddp = wrap_for_training([model], settings)
    build_optimizer(ddp, settings)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    mbs = pack_microbatches(make_groups(seed=5), num_microbatches=2, uniform_length=True)
    for mb in mbs:
        mb.to(device)
        mb.loss_inputs.anchor_logprobs = mb.rollout_logprobs.clone()
    worst = 0.0
    for name, options in (("gift", {"grad_mode": "detached"}), ("gift", {"grad_mode": "full"}), ("grpo", {})):
        loss = build_loss(name, options)
        GiftSchedule(ddp, loss, ScheduleSettings(vocab_size=VOCAB, temperature=0.8), pg).forward_backward(mbs)
        ours = {n: p.main_grad.detach().clone().float() for n, p in model.named_parameters()}
        ddp[0].zero_grad_buffer()  # DDP's hooks accumulate the plain backward into main_grad too
        total, count = 0.0, 0.0
        for mb in mbs:
            logits = model(mb.tokens, mb.position_ids, None).float()[..., :VOCAB]
            logp = torch.log_softmax(logits / 0.8, dim=-1).gather(-1, mb.targets[..., None])[..., 0]
            out = loss(logp, mb.loss_inputs)
            total, count = total + out.loss_sum, count + out.num_sequences
        (total / count).backward()
        for n, p in model.named_parameters():
            plain = p.main_grad.float()
            scale = float(plain.abs().max()) + 1e-12
            worst = max(worst, float((ours[n] - plain).abs().max()) / scale)
    return worst


@pytest.mark.distributed
def test_schedule_matches_plain_autograd_on_cpu():
    worst = run_distributed(schedule_vs_autograd, 1)[0]
    assert worst < 1e-4, worst
