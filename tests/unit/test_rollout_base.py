"""Rollout interface pieces that need no vLLM: SamplingConfig validation, result views, weight buckets."""
from __future__ import annotations

import pytest
import torch

from megatron_gift.rollout.base import RolloutResult, Sample, SamplingConfig
from megatron_gift.rollout.buckets import iter_buckets, unit_of
from megatron_gift.rollout.vllm_config import VllmConfig


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop=("",)), r"stop\[0\]"),
    (dict(stop_token_ids=(3, -1)), r"stop_token_ids\[1\]"),
    (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_sampling_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_sampling_config_normalises_lists():
    cfg = SamplingConfig(stop=["a"], stop_token_ids=[1, 2], temperature=0)
    assert cfg.stop == ("a",) and cfg.stop_token_ids == (1, 2) and cfg.greedy
    hash(cfg)  # frozen and hashable


def _result():
    samples = [[Sample([1, 2], [-0.1, -0.2], "stop"), Sample([3], [-0.3], "length")],
               [Sample([4, 5, 6], [-0.4, -0.5, -0.6], "length"), Sample([], [], "stop")]]
    return RolloutResult(prompt_token_ids=[[9, 9], [8]], samples=samples, n=2)


def test_flat_view_and_groups():
    result = _result()
    flat = result.flat(group_ids=[40, 41])
    assert flat.prompt_index == [0, 0, 1, 1] and flat.sample_index == [0, 1, 0, 1]
    assert flat.group_id == [40, 40, 41, 41]
    assert flat.response_token_ids == [[1, 2], [3], [4, 5, 6], []]
    assert flat.prompt_token_ids[2] == [8] and flat.finish_reasons[1] == "length"
    assert result.num_response_tokens == 6
    groups = result.to_groups(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_ids=[40, 41])
    assert [g.group_id for g in groups] == [40, 41]
    assert groups[1].rewards.tolist() == [3.0, 4.0]
    assert torch.equal(groups[0].rollout_logprobs[0], torch.tensor([-0.1, -0.2]))
    with pytest.raises(ValueError, match="rewards has shape"):
        result.to_groups(torch.zeros(3))
    with pytest.raises(ValueError, match="1 group ids for 2 prompts"):
        result.flat(group_ids=[1])


def test_result_validation():
    with pytest.raises(ValueError, match="prompt 1 has 1 samples, expected n=2"):
        RolloutResult([[1], [2]], [[Sample([1], [0.0], "stop")] * 2, [Sample([1], [0.0], "stop")]], n=2)
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        Sample([1, 2], [0.0], "stop")
    with pytest.raises(ValueError, match="unknown finish reason"):
        Sample([1], [0.0], "eos")


def test_unit_of():
    assert unit_of("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert unit_of("model.language_model.layers.3.mlp.experts.7.up_proj.weight") == "model.language_model.layers.3"
    assert unit_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert unit_of("lm_head.weight") == "lm_head"


def _layer_weights(num_layers, numel=10):
    out = [("model.embed_tokens.weight", torch.zeros(numel))]
    for i in range(num_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
            out.append((f"model.layers.{i}.{part}.weight", torch.zeros(numel)))
    return out + [("model.norm.weight", torch.zeros(numel)), ("lm_head.weight", torch.zeros(numel))]


@pytest.mark.parametrize("bucket_bytes", [1, 100, 160, 400, 10 ** 9])
def test_buckets_cover_everything_once_and_never_split_a_layer(bucket_bytes):
    weights = _layer_weights(5)  # every tensor 40 bytes; a layer 160 bytes
    buckets = list(iter_buckets(iter(weights), bucket_bytes))
    assert [name for b in buckets for name, _ in b] == [name for name, _ in weights]
    for b in buckets:
        # every unit that appears in a bucket appears completely in it
        units = {unit_of(n) for n, _ in b}
        for unit in units:
            assert [n for n, _ in b if unit_of(n) == unit] == [n for n, _ in weights if unit_of(n) == unit]
        size = sum(t.numel() * t.element_size() for _, t in b)
        # over budget only when a single unit alone exceeds it
        assert size <= bucket_bytes or len(units) == 1
    if bucket_bytes == 10 ** 9:
        assert len(buckets) == 1
    # greedy fill: a bucket was closed only because the next unit would not fit
    for b, nxt in zip(buckets, buckets[1:]):
        first_unit = unit_of(nxt[0][0])
        next_size = sum(t.numel() * t.element_size() for n, t in nxt if unit_of(n) == first_unit)
        assert sum(t.numel() * t.element_size() for _, t in b) + next_size > bucket_bytes
    if bucket_bytes == 400:
        assert len(buckets) == 3  # [embed, L0, L1] [L2, L3] [L4, norm, lm_head]


def test_buckets_stream_lazily():
    pulled = []

    def gen():
        for item in _layer_weights(4):
            pulled.append(item[0])
            yield item

    it = iter_buckets(gen(), 160)
    first = next(it)
    # the first bucket (the embedding) is released once the next unit starts: nothing beyond layer 0 pulled
    assert [n for n, _ in first] == ["model.embed_tokens.weight"]
    assert len(pulled) <= 1 + 4 + 1


def test_buckets_reject_bad_streams():
    weights = _layer_weights(2)
    shuffled = weights[:2] + weights[5:6] + weights[2:5] + weights[6:]  # layer 0 interrupted by layer 1
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight'.*contiguously"):
        list(iter_buckets(iter(shuffled), 100))
    with pytest.raises(ValueError, match="given twice"):
        list(iter_buckets(iter(weights + weights[:1]), 100))
    with pytest.raises(TypeError, match="'x' is a list"):
        list(iter_buckets(iter([("x", [1.0])]), 100))
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(iter(weights), 0))


def test_vllm_config_validation(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        VllmConfig(model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="dtype"):
        VllmConfig(model=str(tmp_path), dtype="fp8")
    with pytest.raises(ValueError, match="sleep_level"):
        VllmConfig(model=str(tmp_path), sleep_level=3)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        VllmConfig(model=str(tmp_path), distributed_executor_backend="ray2")
    with pytest.raises(ValueError, match="vllm.weight_sync must be one of .* got 'copy'"):
        VllmConfig(model=str(tmp_path), weight_sync="copy")
    assert "weight_sync" not in VllmConfig(model=str(tmp_path), weight_sync="map").llm_kwargs(on_gpu=False)
    cpu = VllmConfig(model=str(tmp_path)).llm_kwargs(on_gpu=False)
    assert cpu["logprobs_mode"] == "processed_logprobs" and cpu["enforce_eager"] is True
    assert cpu["kv_cache_memory_bytes"] == 256 << 20 and "enable_sleep_mode" not in cpu
    gpu = VllmConfig(model=str(tmp_path), tensor_parallel_size=2,
                     distributed_executor_backend="external_launcher").llm_kwargs(on_gpu=True)
    assert gpu["enable_sleep_mode"] is True and gpu["enforce_eager"] is False
    assert gpu["distributed_executor_backend"] == "external_launcher" and "kv_cache_memory_bytes" not in gpu
