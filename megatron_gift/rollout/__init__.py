"""Rollout engines (L2): the only package that imports vllm (lazily, inside `vllm_engine`).

`base` holds the engine interface and result types; `VllmEngine` / `VllmConfig` are the vLLM backend.
"""
from megatron_gift.rollout.base import (FlatRollout, RolloutEngine, RolloutResult, Sample,  # noqa: F401
                                        SamplingConfig)
from megatron_gift.rollout.vllm_config import VllmConfig  # noqa: F401


def __getattr__(name):
    # Importing VllmEngine is cheap (vllm is imported when an engine starts), but keep the package
    # import free of it anyway so `import megatron_gift.rollout` never pulls vLLM-related code paths.
    if name == "VllmEngine":
        from megatron_gift.rollout.vllm_engine import VllmEngine
        return VllmEngine
    raise AttributeError(name)
