"""Accuracy of a checkpoint on a prompt set (L3): greedy pass@1, mean@k and unbiased pass@k.

Owns: taking a model path (a Hugging Face dir, or a Megatron checkpoint written by
megatron-gift-convert-hf-to-mcore, exported to a temporary HF dir), generating greedy and / or k sampled
responses per prompt with the project's rollout engine (`VllmEngine`), scoring them with the reward
registry, the metrics, and the JSON report (written atomically, never over an existing file).
Prompts come from the project's data loading (`PromptDataConfig` / `build_prompt_dataset`), so the
prompt formatting (chat template, keys, long-prompt filter) is the trainer's.

Metrics (a response is *correct* when its total reward >= `correct_threshold`):
    pass@1_greedy   fraction of prompts whose greedy response is correct;
    mean@k          mean over prompts of (correct samples / k): the sampled pass@1 estimate;
    pass@j          for j <= k, the unbiased estimator of Chen et al. 2021 (HumanEval):
                    mean over prompts of 1 - C(k - c, j) / C(k, j), c = correct samples of the prompt;
    reward_mean_*   mean total reward (greedy / sampled), whatever the threshold.
Not owned: the training loop's own greedy eval (trainer.py), reward functions, the engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from megatron_gift.data import PromptDataConfig, PromptDataset, build_prompt_dataset, load_tokenizer
from megatron_gift.hf.files import CONVERSION_INFO
from megatron_gift.rewards import RewardConfig, build_rewards
from megatron_gift.rollout.base import RolloutEngine, SamplingConfig


@dataclass
class EvalSettings:
    """How responses are generated and judged.

    k               sampled responses per prompt (0: greedy only); pass@j is reported for j = 1, 2, 4, ... <= k
                    and j = k.
    greedy          also generate one greedy response per prompt (pass@1_greedy).
    temperature / top_p / top_k / max_new_tokens   sampling settings (greedy uses max_new_tokens only).
    seed            sampling seed (same seed, model and data -> same samples).
    correct_threshold  total reward at or above which a response counts as correct.
    batch_prompts   prompts per engine call (progress is reported per call).
    max_prompts     evaluate only the first this many prompts (0: all).
    """

    k: int = 8
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    seed: int = 0
    correct_threshold: float = 1.0
    batch_prompts: int = 64
    max_prompts: int = 0

    def __post_init__(self) -> None:
        for name in ("k", "max_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"evaluation: '{name}' must be an int >= 0, got {value!r}")
        if not isinstance(self.batch_prompts, int) or self.batch_prompts < 1:
            raise ValueError(f"evaluation: 'batch_prompts' must be an int >= 1, got {self.batch_prompts!r}")
        if self.k == 0 and not self.greedy:
            raise ValueError("evaluation: nothing to do (k = 0 and greedy off)")
        self.sampling()  # validates temperature / top_p / top_k / max_new_tokens now

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)

    def pass_ks(self) -> List[int]:
        ks = [j for j in (2 ** i for i in range(31)) if j <= self.k]
        return ks + ([self.k] if self.k and self.k not in ks else [])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k) (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class PromptRow:
    """One prompt's outcome: greedy response / reward and the sampled rewards (report rows)."""

    index: int
    prompt: str
    answer: Optional[str]
    greedy_response: Optional[str] = None
    greedy_reward: Optional[float] = None
    sample_rewards: List[float] = field(default_factory=list)
    sample_responses: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- model path
def model_kind(path: str | Path) -> str:
    """'hf' (config.json + weights) or 'mcore' (a converted Megatron checkpoint); a clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if (p / CONVERSION_INFO).is_file():
        return "mcore"
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return "hf"
    raise ValueError(f"{p}: neither a Hugging Face model dir (config.json + *.safetensors) nor a Megatron "
                     f"checkpoint ({CONVERSION_INFO} + model/, as megatron-gift-convert-hf-to-mcore writes)")


def export_mcore_to_hf(mcore_dir: Path, out_dir: Path, key_prefix: str = "") -> None:
    """Write the HF form of a converted Megatron checkpoint into the (new, empty) out_dir, one key at a time."""
    from megatron_gift.mcore.convert import write_mcore_checkpoint_as_hf
    write_mcore_checkpoint_as_hf(mcore_dir, out_dir, key_prefix)


@contextlib.contextmanager
def hf_model_dir(path: str | Path, key_prefix: str = "", log: Callable[[str], None] = print) -> Iterator[str]:
    """The HF dir to load: `path` itself, or a temporary export of a Megatron checkpoint (removed after)."""
    if model_kind(path) == "hf":
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="mg_eval_hf_") as tmp:
        from megatron_gift.hf.files import check_disjoint
        check_disjoint(path, tmp, "--model", "the temporary export")
        start = time.perf_counter()
        export_mcore_to_hf(Path(path), Path(tmp), key_prefix)
        log(f"[eval] exported Megatron checkpoint {path} to HF in {time.perf_counter() - start:.1f} s")
        yield tmp


# ----------------------------------------------------------------------------------------- evaluation
def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def generate_and_score(engine: RolloutEngine, dataset: PromptDataset, tokenizer, rewards,
                       settings: EvalSettings, log: Callable[[str], None] = print) -> List[PromptRow]:
    """Greedy and / or k sampled responses for every prompt of `dataset`, scored; one row per prompt."""
    count = len(dataset) if settings.max_prompts == 0 else min(settings.max_prompts, len(dataset))
    records = [dataset[i] for i in range(count)]
    rows = [PromptRow(r.index, r.text, r.answer) for r in records]
    start = time.perf_counter()
    for batch in _batches(count, settings.batch_prompts):
        recs = [records[i] for i in batch]
        ids = [r.prompt_ids for r in recs]
        if settings.greedy:
            outs = engine.greedy(ids, settings.max_new_tokens)
            texts = [tokenizer.decode(o) for o in outs]
            scores = rewards.score_records(recs, texts, [len(o) for o in outs]).total
            for i, text, score in zip(batch, texts, scores):
                rows[i].greedy_response, rows[i].greedy_reward = text, score
        if settings.k:
            # One seed per engine call: a prompt's samples depend on (seed, batch_prompts, its position),
            # both recorded in the report's settings.
            result = engine.generate(ids, settings.k, settings.sampling(), seed=settings.seed * 1_000_003 + batch[0])
            texts = [tokenizer.decode(s.token_ids) for group in result.samples for s in group]
            lengths = [len(s.token_ids) for group in result.samples for s in group]
            scores = rewards.score_records([r for r in recs for _ in range(settings.k)], texts, lengths).total
            for j, i in enumerate(batch):
                part = slice(j * settings.k, (j + 1) * settings.k)
                rows[i].sample_responses, rows[i].sample_rewards = texts[part], scores[part]
        log(f"[eval] {batch.stop}/{count} prompts ({time.perf_counter() - start:.1f} s)")
    return rows


def summarize(rows: Sequence[PromptRow], settings: EvalSettings) -> Dict[str, float]:
    """The report's metrics from per-prompt rows (see the module docstring)."""
    if not rows:
        raise ValueError("evaluation: no prompts to summarise")
    thr, n = settings.correct_threshold, len(rows)
    out: Dict[str, float] = {}
    if settings.greedy:
        out["pass@1_greedy"] = sum(r.greedy_reward >= thr for r in rows) / n
        out["reward_mean_greedy"] = sum(r.greedy_reward for r in rows) / n
    if settings.k:
        k = settings.k
        correct = [sum(x >= thr for x in r.sample_rewards) for r in rows]
        out[f"mean@{k}"] = sum(c / k for c in correct) / n
        for j in settings.pass_ks():
            out[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct) / n
        out["reward_mean_sampled"] = sum(sum(r.sample_rewards) for r in rows) / (n * k)
    return out


# ----------------------------------------------------------------------------------------- the job
@dataclass
class EvalJob:
    """Everything one evaluation needs; `run_evaluation(job)` carries it out."""

    model: str
    data: PromptDataConfig
    rewards: RewardConfig = field(default_factory=RewardConfig)
    settings: EvalSettings = field(default_factory=EvalSettings)
    engine: Dict[str, Any] = field(default_factory=dict)   # VllmConfig fields except `model`
    tokenizer: Optional[str] = None                          # default: the model dir's tokenizer
    key_prefix: str = ""                                     # Megatron checkpoint key prefix
    per_prompt: bool = False                                 # add per-prompt rows to the report


def check_output_path(out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"report {out} already exists (pass --overwrite to replace it)")
    if out.suffix != ".json":
        raise ValueError(f"report path {out} must end in .json")
    return out


def write_report(report: Dict[str, Any], out: str | Path, overwrite: bool = False) -> Path:
    """Write the JSON report atomically (temp file + rename); an existing file is kept unless overwrite."""
    out = check_output_path(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def run_evaluation(job: EvalJob, log: Callable[[str], None] = print, engine_factory=None) -> Dict[str, Any]:
    """Load prompts and rewards (cheap, fail fast), start the engine on the model, generate, score, report."""
    from megatron_gift.rollout.vllm_config import VllmConfig

    kind = model_kind(job.model)
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    # Everything cheap first (a converted checkpoint carries the tokenizer files too), so bad data, keys,
    # rewards or engine settings fail before an export or an engine start.
    tokenizer = load_tokenizer(job.tokenizer or job.model)
    dataset = build_prompt_dataset(job.data, tokenizer)
    rewards = build_rewards(job.rewards)
    engine_config = VllmConfig(model=job.model, **{"dtype": "auto" if _on_gpu() else "float32",
                                                   "seed": job.settings.seed, **job.engine})
    log(f"[eval] {len(dataset)} prompts from {job.data.path} ({dataset.stats.rows_skipped} malformed, "
        f"{dataset.stats.too_long} too long); model {job.model} ({kind})")
    try:
        with hf_model_dir(job.model, job.key_prefix, log) as hf_dir:
            timings["load_s"] = time.perf_counter() - start
            t0 = time.perf_counter()
            engine = (engine_factory or _vllm_engine)(dataclasses.replace(engine_config, model=hf_dir))
            timings["engine_start_s"] = time.perf_counter() - t0
            try:
                t0 = time.perf_counter()
                rows = generate_and_score(engine, dataset, tokenizer, rewards, job.settings, log)
                timings["generate_and_score_s"] = time.perf_counter() - t0
            finally:
                engine.close()
    finally:
        rewards.close()
    report = {
        "model": str(Path(job.model).absolute()), "model_format": kind,
        "data": str(Path(job.data.path).absolute()), "num_prompts": len(rows),
        "data_stats": {"rows_read": dataset.stats.rows_read, "rows_skipped": dataset.stats.rows_skipped,
                       "too_long": dataset.stats.too_long},
        "metrics": summarize(rows, job.settings),
        "metric_notes": {"pass@1_greedy": "one greedy response per prompt",
                         "mean@k": "mean over prompts of the fraction of the k sampled responses that are correct "
                                   "(the sampled pass@1)",
                         "pass@j": "unbiased estimator 1 - C(k-c, j)/C(k, j) from the k samples",
                         "correct": f"total reward >= {job.settings.correct_threshold}"},
        "settings": asdict(job.settings),
        "data_config": asdict(job.data),
        "rewards": asdict(job.rewards),
        "engine": {k: v for k, v in asdict(engine_config).items() if k != "model"},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if job.per_prompt:
        report["per_prompt"] = [asdict(r) for r in rows]
    return report


def _on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def _vllm_engine(config):
    from megatron_gift.rollout.vllm_engine import VllmEngine
    return VllmEngine(config)
