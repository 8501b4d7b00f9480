"""A model built for loading (perform_initialization=False, as on resume and in the converters) carries the
same parameter attributes as a freshly initialised one, at TP=2 and at PP=2 with tied embeddings.

Megatron reads per-parameter attributes that its layers set while initialising: `tensor_model_parallel`,
`partition_dim`, `partition_stride` (grad-norm / clipping count TP rank > 0's shards only when they are
set; megatron-core 0.16.1 sets them only when it initialises), `allreduce`, `sequence_parallel`,
`shared_embedding`, `is_embedding_or_output_parameter`... Every attribute a parameter has (its __dict__) is
compared by name and value. Runtime: ~20 s (two 2-rank spawns).
"""
from __future__ import annotations

import pytest

from megatron_gift.mcore.testing.harness import run_distributed
from tests.tiny_hf import tiny_configs

pytestmark = pytest.mark.distributed


def _attrs(model):
    return {name: {k: repr(v) for k, v in sorted(vars(p).items())} for name, p in model.named_parameters()}


def _compare_builds(rank, world_size, config):
    from megatron_gift.mcore.model import build_gpt_model

    fresh = _attrs(build_gpt_model(config))
    unloaded = _attrs(build_gpt_model(config, perform_initialization=False))
    return fresh, unloaded


@pytest.mark.parametrize("name,tp,pp", [("llama2_tied", 2, 1), ("qwen2_bias_tied", 1, 2),
                                        ("mistral_untied", 2, 1)])
def test_unloaded_build_has_the_attributes_of_a_fresh_build(name, tp, pp):
    results = run_distributed(_compare_builds, world_size=2, tp=tp, pp=pp, config=tiny_configs()[name])
    for rank, (fresh, unloaded) in enumerate(results):
        assert fresh.keys() == unloaded.keys()
        differ = {n: (fresh[n], unloaded[n]) for n in fresh if fresh[n] != unloaded[n]}
        assert not differ, f"rank {rank}: attributes differ (fresh, unloaded): {differ}"
        if tp > 1:  # the attribute grad-norm relies on is really there
            tp_params = [n for n, a in fresh.items() if a.get("tensor_model_parallel") == "True"]
            assert any(n.endswith("linear_qkv.weight") for n in tp_params), fresh
