"""The rollout-engine interface (no vLLM import here): what the trainer calls to sample and sync weights.

Owns: `SamplingConfig` (validated), the result types of `generate` (`RolloutResult`, its flat view and
its conversion to `algo.packing.RolloutGroup`), and the abstract `RolloutEngine` every backend implements
(vLLM on CPU or GPU today; a fake in tests). It does not own how a backend samples or loads weights.

Log-prob contract (`Sample.logprobs`): for each response token, the log-probability of the sampled token
under the distribution the sampler drew it from: log_softmax(logits / temperature), restricted to and
renormalised over the top-k / top-p kept set when those filters are on. With top_p = 1 and top_k off this
is exactly log_softmax(logits / T)[token], which the trainer recomputes with the same temperature. With
temperature 0 (greedy) it is log_softmax(logits)[token].
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_gift.algo.packing import RolloutGroup

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled.

    temperature     >= 0; 0 means greedy (argmax).
    top_p           in (0, 1]; 1 disables nucleus filtering.
    top_k           -1 (or 0) disables; otherwise >= 1.
    max_new_tokens  >= 1: response length cap (finish reason "length").
    stop            stop strings (need a tokenizer in the engine; finish reason "stop").
    stop_token_ids  extra token ids that end a response (kept in the output, finish reason "stop").
    ignore_eos      keep generating past the model's EOS token (until max_new_tokens / stop ids).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: Tuple[str, ...] = ()
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists from YAML become tuples so the config stays hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"sampling.temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"sampling.top_k must be an int, -1 or 0 (off) or >= 1, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"sampling.stop[{i}] must be a non-empty string, got {s!r}")
        for i, t in enumerate(self.stop_token_ids):
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"sampling.stop_token_ids[{i}] must be an int >= 0, got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"sampling.ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sample:
    """One sampled response: token ids [L], sampled-token log-probs [L] (see module docstring) and why
    it ended ("stop": EOS / stop id / stop string, "length": max_new_tokens or context, "abort");
    routed_experts (routing replay only): int [P + L - 1, layers, top_k], the experts each token fed through
    the engine (the prompt and every response token but the last) was routed to (algo/routes.py)."""

    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str
    routed_experts: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"sample has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {self.finish_reason!r}; expected one of {FINISH_REASONS}")


@dataclass
class FlatRollout:
    """Every sample of a `RolloutResult` in one list, prompt-major (prompt p's n samples are contiguous).

    prompt_index[i]: which prompt of the batch sample i answers; sample_index[i]: 0..n-1 inside its group;
    group_id[i]: the caller's id for that prompt's group (defaults to prompt_index).
    """

    prompt_index: List[int]
    sample_index: List[int]
    group_id: List[int]
    prompt_token_ids: List[List[int]]
    response_token_ids: List[List[int]]
    logprobs: List[List[float]]
    finish_reasons: List[str]

    def __len__(self) -> int:
        return len(self.prompt_index)


@dataclass
class RolloutResult:
    """`generate`'s output: samples[p][j] is the j-th of n responses to prompt p (prompt order kept)."""

    prompt_token_ids: List[List[int]]
    samples: List[List[Sample]]
    n: int
    timings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.samples) != len(self.prompt_token_ids):
            raise ValueError(f"{len(self.samples)} sample groups for {len(self.prompt_token_ids)} prompts")
        for p, group in enumerate(self.samples):
            if len(group) != self.n:
                raise ValueError(f"prompt {p} has {len(group)} samples, expected n={self.n}")

    @property
    def num_prompts(self) -> int:
        return len(self.samples)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(s.token_ids) for group in self.samples for s in group)

    def flat(self, group_ids: Optional[Sequence[int]] = None) -> FlatRollout:
        """The samples as one prompt-major list with prompt index and group id per sample."""
        ids = self._group_ids(group_ids)
        out = FlatRollout([], [], [], [], [], [], [])
        for p, group in enumerate(self.samples):
            for j, s in enumerate(group):
                out.prompt_index.append(p)
                out.sample_index.append(j)
                out.group_id.append(ids[p])
                out.prompt_token_ids.append(self.prompt_token_ids[p])
                out.response_token_ids.append(s.token_ids)
                out.logprobs.append(s.logprobs)
                out.finish_reasons.append(s.finish_reason)
        return out

    def to_groups(self, rewards: torch.Tensor, group_ids: Optional[Sequence[int]] = None) -> List[RolloutGroup]:
        """Attach rewards [num_prompts, n] (or flat [num_prompts * n], prompt-major) and build the
        trainer's packing groups, with the engine's log-probs as `rollout_logprobs`."""
        ids = self._group_ids(group_ids)
        rewards = torch.as_tensor(rewards)
        expected = (self.num_prompts, self.n)
        if rewards.numel() != self.num_prompts * self.n:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected {expected} "
                             f"(or {self.num_prompts * self.n} flat, prompt-major)")
        rewards = rewards.reshape(expected)
        groups = []
        for p, group in enumerate(self.samples):
            groups.append(RolloutGroup(
                group_id=ids[p],
                prompt=torch.tensor(self.prompt_token_ids[p], dtype=torch.int64),
                responses=[torch.tensor(s.token_ids, dtype=torch.int64) for s in group],
                rewards=rewards[p].clone(),
                rollout_logprobs=[torch.tensor(s.logprobs, dtype=torch.float32) for s in group],
                routed_experts=_routes(group),
            ))
        return groups

    def _group_ids(self, group_ids: Optional[Sequence[int]]) -> List[int]:
        if group_ids is None:
            return list(range(self.num_prompts))
        if len(group_ids) != self.num_prompts:
            raise ValueError(f"{len(group_ids)} group ids for {self.num_prompts} prompts")
        return [int(g) for g in group_ids]


def _routes(group: List[Sample]) -> Optional[List[torch.Tensor]]:
    """The samples' routed experts (None when the engine returned none; all or none of a group have them)."""
    have = [s.routed_experts is not None for s in group]
    if any(have) and not all(have):
        raise ValueError("routed experts returned for only some samples of a group")
    return [s.routed_experts for s in group] if all(have) else None


NamedTensors = Iterable[Tuple[str, torch.Tensor]]


class RolloutEngine(abc.ABC):
    """A sampler the trainer can feed fresh weights. Implementations: `VllmEngine`."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: List[List[int]], n: int, sampling: SamplingConfig,
                 seed: int, first_index: int = 0) -> RolloutResult:
        """n samples per prompt. Same (prompts, n, sampling, seed, weights) -> same samples.

        Prompt p is seeded as prompt `first_index + p` of the call's seed: a batch split over several
        engines (each passing its slice's offset) draws the samples one call over the whole batch would."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: NamedTensors) -> None:
        """Load new weights given as (Hugging Face name, tensor) pairs, streamed: the engine loads them in
        bounded-size buckets and never holds more than one bucket beyond its own weights."""

    @property
    def supports_sleep(self) -> bool:
        """Whether sleep() really frees memory (False: sleep/wake are logged no-ops)."""
        return False

    def sleep(self) -> None:
        """Free KV cache (and weights, where supported) while the trainer runs. Default: no-op."""

    def wake(self) -> None:
        """Restore what sleep() freed. Default: no-op."""

    def greedy(self, prompt_token_ids: List[List[int]], max_new_tokens: int) -> List[List[int]]:
        """Greedy continuations (EOS still ends a response) as token-id lists, one per prompt."""
        result = self.generate(prompt_token_ids, 1, SamplingConfig(temperature=0.0,
                                                                  max_new_tokens=max_new_tokens), seed=0)
        return [group[0].token_ids for group in result.samples]

    def close(self) -> None:
        """Release the engine's resources. Default: nothing to release."""
