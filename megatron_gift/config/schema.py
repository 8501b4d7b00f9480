"""Run-config machinery (L0): YAML in, `--set key=value` overrides, the resolved config out, and the
plain configs of the training loop and the parallel layout.

Owns: reading a YAML run config into a dict, applying dotted overrides (values parsed as YAML, so
`--set trainer.steps=3` is an int and `--set loss.name=grpo` a string), naming unknown keys with the
nearest valid one (utils/dataclass_dict.py), and writing the resolved config to the run directory.
Sub-configs owned by lower layers (data, rewards, rollout, losses) are composed in run_config.py.
"""
from __future__ import annotations

import dataclasses
import enum
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

from megatron_gift.rollout.dynamic_sampling import DynamicSamplingConfig
from megatron_gift.utils.dataclass_dict import from_dict


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2's exponent floats: `lr: 3e-4` is a float (YAML 1.1 reads a string), as with --set."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """A YAML mapping from `path`; a clear error for a missing file or a non-mapping document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run config '{path}' does not exist")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"run config '{path}' is not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"run config '{path}' is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"run config '{path}' must be a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: Dict[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` overrides in place (value parsed as YAML); returns data."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override '{item}' has an empty key component")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"override '{item}': '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _parse_value(raw: str) -> Any:
    """YAML scalar parsing, plus floats YAML 1.1 leaves as strings (`1e-4`)."""
    if not raw.strip():
        return ""
    value = yaml.load(raw, Loader=_Loader)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def to_plain(obj: Any) -> Any:
    """Dataclasses / tuples / enums -> plain YAML-safe Python values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if callable(obj) and not isinstance(obj, (str, int, float, bool)):
        return getattr(obj, "__name__", repr(obj))
    return obj


def write_resolved(config: Any, path: str | Path, log=print) -> Path:
    """Write the fully resolved config as YAML. A different existing one is kept under a new name
    (config.resolved.<time>.yaml) and the change is announced, never overwritten silently."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_plain(config), sort_keys=False)
    if path.is_file() and path.read_text() != text:
        kept = path.with_name(f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
        path.replace(kept)
        log(f"[config] the resolved config differs from the one this run directory had: the previous one is kept "
            f"as {kept}")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


@dataclass
class ParallelConfig:
    """Megatron parallel layout; dp is what remains of the world size.

    recompute: activation recompute, "none", "selective" (attention core) or "full" (every layer keeps
        only its input; what long sequences on big models need, see `python -m megatron_gift.cli.dry_run`).
    ep / etp: expert parallel and expert tensor parallel sizes of a mixture-of-experts model (Megatron's
        expert grid over the same ranks: ep * etp must divide tp * cp * dp, i.e. the ranks of a pipeline stage).
    """

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute: str = "none"
    ep: int = 1
    etp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "etp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name} must be an int >= 1, got {value!r}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp > 1")
        if self.vpp is not None and self.pp < 2:
            raise ValueError(f"parallel.vpp={self.vpp} needs parallel.pp >= 2")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"parallel.recompute is {self.recompute!r}; valid: none, selective, full")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = "
                             f"{self.tp}*{self.pp}*{self.cp} = {model_parallel}")
        if (world_size // self.pp) % (self.ep * self.etp):
            raise ValueError(f"parallel.ep * parallel.etp = {self.ep}*{self.etp} must divide the {world_size // self.pp} "
                             f"ranks of a pipeline stage (tp*cp*dp; world size {world_size}, pp={self.pp})")
        return world_size // model_parallel


def _check_throughput(t) -> None:
    """trainer.max_tokens_per_microbatch / trainer.packing: valid values, and never both microbatch rules."""
    budget = t.max_tokens_per_microbatch
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"trainer.max_tokens_per_microbatch must be an int >= 0 (0: off), got {budget!r}")
    if budget and t.microbatches != 1:
        raise ValueError(f"trainer.max_tokens_per_microbatch={budget} sets the microbatches by tokens: leave "
                         f"trainer.microbatches at 1 (got {t.microbatches})")
    if t.packing not in ("none", "rows", "thd"):
        raise ValueError(f"trainer.packing must be 'none', 'rows' or 'thd', got {t.packing!r}")


@dataclass
class TrainerConfig:
    """The loop: steps, prompts per step (global), responses per prompt, microbatches, logging.

    updates_per_rollout: optimizer steps per rollout batch (the GIFT recipe uses 4: 1024 prompts, 4 x 256);
        with anchor `old` every update of a batch is anchored to the policy that generated it.
    eval_every: greedy accuracy on `eval_data` before training, every this many steps and at the end (0: off);
    eval_prompts: how many eval prompts (the first ones of the file).

    Long runs (checkpoint/manager.py, resilience.py):
    save_dir: where checkpoints go ("" = RUN_DIR/checkpoints); save_every: a checkpoint every this many
        steps and at the end (0: only when a stop is requested); keep_last: complete checkpoints kept;
    resume: "auto" (newest complete checkpoint in save_dir, else a fresh start), "none", or a checkpoint path;
    time_budget_s: stop (save, exit with the requeue code) before this many seconds of wall time (0: off);
    async_save: write checkpoints in a background process (Megatron's async dist checkpointing).
    dynamic_sampling: DAPO's dynamic sampling for any loss (rollout/dynamic_sampling.py): enabled, max_rounds,
        on_cap.

    Throughput (algo/packing.py, algo/seq_packing.py):
    max_tokens_per_microbatch: > 0 bins whole groups into microbatches by tokens (first-fit decreasing), each
        padded only to its own longest sequence (packed: counting real tokens); their number then varies per
        step and rank (`microbatches` must stay 1); 0: `microbatches` equal microbatches;
    packing: "none" (one sequence per row), "rows" (sequences share rows, block-diagonal causal mask; any
        attention that takes a mask, e.g. the local spec on CPU) or "thd" (one row, Transformer Engine THD).
    """

    run_dir: str = "runs/default"
    steps: int = 10
    prompts_per_step: int = 8
    responses_per_prompt: int = 4
    microbatches: int = 1
    updates_per_rollout: int = 1
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 0
    eval_prompts: int = 64
    save_dir: str = ""
    save_every: int = 0
    keep_last: int = 2
    resume: str = "auto"
    time_budget_s: float = 0.0
    async_save: bool = False
    dynamic_sampling: DynamicSamplingConfig = dataclasses.field(default_factory=DynamicSamplingConfig)
    max_tokens_per_microbatch: int = 0
    packing: str = "none"

    def __post_init__(self) -> None:
        _check_throughput(self)
        if isinstance(self.dynamic_sampling, dict):
            self.dynamic_sampling = from_dict(DynamicSamplingConfig, self.dynamic_sampling, "trainer.dynamic_sampling")
        if self.dynamic_sampling.enabled and self.responses_per_prompt < 2:
            raise ValueError("trainer.dynamic_sampling.enabled needs trainer.responses_per_prompt >= 2 (a group of "
                             "one has no reward variance)")
        for name in ("steps", "prompts_per_step", "responses_per_prompt", "microbatches", "updates_per_rollout",
                     "log_every", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"trainer.{name} must be an int >= 1, got {value!r}")
        if self.responses_per_prompt < 2:
            raise ValueError(f"trainer.responses_per_prompt is {self.responses_per_prompt}: GIFT and GRPO normalise "
                             "rewards within each prompt's group of responses, which needs at least 2 (a group of one "
                             "has no spread to learn from); use 2 or more")
        if self.prompts_per_step % self.updates_per_rollout:
            raise ValueError(f"trainer.prompts_per_step={self.prompts_per_step} must be divisible by "
                             f"trainer.updates_per_rollout={self.updates_per_rollout}")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0:
            raise ValueError(f"trainer.save_every must be an int >= 0 (0: save only on stop requests), "
                             f"got {self.save_every!r}")
        if not isinstance(self.time_budget_s, (int, float)) or self.time_budget_s < 0:
            raise ValueError(f"trainer.time_budget_s must be a number >= 0 (0: no budget), got {self.time_budget_s!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"trainer.resume must be 'auto', 'none' or a checkpoint path, got {self.resume!r}")
        if not isinstance(self.async_save, bool):
            raise ValueError(f"trainer.async_save must be true or false, got {self.async_save!r}")
        if self.prompts_per_step % self.updates_per_rollout:  # else the trailing groups are never trained on
            raise ValueError(f"trainer.prompts_per_step={self.prompts_per_step} must be divisible by "
                             f"trainer.updates_per_rollout={self.updates_per_rollout}")

    @property
    def packed_mode(self):
        """None, "rows" or "thd" (what pack_microbatches takes)."""
        return None if self.packing == "none" else self.packing

    @property
    def checkpoint_dir(self) -> str:
        return self.save_dir or str(Path(self.run_dir) / "checkpoints")
