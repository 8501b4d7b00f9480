"""The MoE load-balancing loss on a model built without transformers, so the same check runs on a lent GPU
(tests/gpu/test_moe_gpu.py, NCCL, alltoall dispatch): grad(aux on) - grad(aux off) of the last MoE layer's
router weight equals autograd of the Switch loss recomputed in plain torch from that router's captured inputs,
coeff * sum_mb (n_mb / N_tok) * E * sum_i f_i P_i over valid tokens (docs/algorithm.md). Only the last layer's
router is compared: its weight reaches no later layer's loss, so the reference needs no backward through the
model. Token-budget microbatches of unequal length make the token weights and the padding mask matter."""
import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed
from tests.distributed.test_gift_schedule import make_groups

COEFF = 4.0
TINY_QWEN3_MOE = dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=200,
                      max_position_embeddings=256, rms_norm_eps=1e-5, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                      rope_theta=10000.0, router_aux_loss_coef=0.0)


def _reference(router_inputs, masks, weight, top_k):
    """Gradient of the token-weighted Switch loss of one router, from its inputs [S, b, H] and pads [b, S]."""
    w = weight.detach().clone().requires_grad_(True)
    valid = [(~m).t().reshape(-1).float() for m in masks]  # Megatron's [s, b] token order
    n_tok = sum(v.sum() for v in valid)
    total = 0.0
    for x, v in zip(router_inputs, valid):
        scores = torch.softmax(x.reshape(-1, x.shape[-1]).float() @ w.t(), dim=-1) * v[:, None]
        routed = torch.zeros_like(scores).scatter(1, torch.topk(scores, top_k, dim=-1).indices, 1.0) * v[:, None]
        n = v.sum()
        switch = w.shape[0] * (routed.sum(0) / (n * top_k) * scores.sum(0) / n).sum()
        total = total + COEFF * (n / n_tok) * switch
    total.backward()
    return w.grad


def aux_router_check(rank, world_size, device="cpu"):
    """(max |Megatron - reference|, max |reference|) for the last MoE layer's router weight."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches, padding_mask
    from megatron_gift.hf.arch import parse_hf_config
    from megatron_gift.mcore.model import build_gpt_model
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    arch = parse_hf_config(TINY_QWEN3_MOE)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    mbs = pack_microbatches(make_groups(n_groups=4, size=3, seed=7), max_tokens=64)
    assert len({mb.tokens.shape for mb in mbs}) > 1
    for mb in mbs:
        mb.to(device)
        mb.loss_inputs.anchor_logprobs = mb.rollout_logprobs.clone()
    weights, grads, captured = None, {}, []
    for key, overrides in (("off", {}), ("on", {"moe_router_load_balancing_type": "aux_loss",
                                                 "moe_aux_loss_coeff": COEFF})):
        model = build_gpt_model(arch, dtype=torch.float32, **overrides).to(device)
        if weights is None:
            weights = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        model.load_state_dict(weights, strict=False)
        router = model.decoder.layers[-1].mlp.router
        hook = router.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach().clone()))
        settings = OptimSettings()
        ddp = wrap_for_training([model], settings, pg)
        build_optimizer(ddp, settings)
        captured.clear()
        GiftSchedule(ddp, build_loss("gift", {"grad_mode": "detached"}), ScheduleSettings(vocab_size=200),
                     pg).forward_backward(mbs)
        hook.remove()
        grads[key] = router.weight.main_grad.detach().clone()
    ref = _reference(captured, [padding_mask(mb) for mb in mbs], router.weight, arch.moe.top_k)
    got = grads["on"] - grads["off"]
    return float((got - ref).abs().max()), float(ref.abs().max())


@pytest.mark.distributed
def test_aux_loss_router_gradient_equals_plain_torch():
    diff, scale = run_distributed(aux_router_check, 1)[0]
    print(f"router aux gradient: max |diff| {diff:.2e}, max |ref| {scale:.2e}")
    assert scale > 1e-3 and diff <= 1e-5 * max(1.0, scale)
