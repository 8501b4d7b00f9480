"""Checks of a run config that need no model, run before anything expensive (warm start, conversion, models,
engines): so that a typo or a bad path is reported in a second, not after minutes of start-up.

Owns: the world size fitting the layout, run_dir / save_dir writable, the rollout engine's keys (unknown
keys name the nearest valid one), the model / data paths that must exist, every reward term (registry names,
kwargs, user modules imported: an import or syntax error names the module file). Raises UserError.
Also removes the run directory's temporary conversions left by killed runs (rank 0, with a message).
Does not own: the checks each config section does itself (config/), building anything.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Optional

from megatron_gift.config.routing_replay import preflight_routing_replay
from megatron_gift.utils.dataclass_dict import nearest
from megatron_gift.utils.errors import UserError


def preflight(cfg, world_size: Optional[int] = None) -> None:
    """Raise UserError naming the key of the first problem found."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    try:
        cfg.check_world(world_size)
    except ValueError as exc:
        raise UserError(f"parallel layout: {exc} (world size {world_size})") from None
    check_writable(cfg.trainer.run_dir, "trainer.run_dir")
    check_writable(cfg.trainer.checkpoint_dir, "trainer.save_dir" if cfg.trainer.save_dir else "trainer.run_dir")
    check_engine_keys(cfg.rollout.engine)
    check_paths(cfg)
    preflight_routing_replay(cfg)  # a dense model, or a vLLM that cannot return routed experts
    check_rewards(cfg.rewards)
    if int(os.environ.get("RANK", "0")) == 0:
        clean_run_dir(cfg.trainer.run_dir)


def clean_run_dir(run_dir: str) -> None:
    """Temporary conversions (`.mcore_from_hf.tmp-PID`, model-sized) left by killed runs (resilience/leftovers.py)."""
    from megatron_gift.resilience.leftovers import clean_stale

    clean_stale(Path(run_dir), ".mcore_from_hf.tmp-*")


def check_writable(path: str, key: str) -> None:
    """The directory exists or can be made, and a file can be written in it (the probe is removed)."""
    target = Path(path)
    existing = next((p for p in [target, *target.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{key}: {path} cannot be a directory: {existing} is a file")
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".write_probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{key}: {path} is not writable ({exc.strerror or exc})") from None


def check_engine_keys(engine: dict) -> None:
    from megatron_gift.rollout.vllm_config import VllmConfig

    if not isinstance(engine, dict):
        raise UserError(f"rollout.engine must be a mapping of vLLM engine settings, got {engine!r}")
    valid = {f.name for f in fields(VllmConfig)} - {"model"}
    for key in engine:
        if key not in valid:
            raise UserError(f"unknown key '{key}' in rollout.engine{nearest(key, valid)} "
                            f"(valid keys: {', '.join(sorted(valid))})")


def check_paths(cfg) -> None:
    if cfg.model.hf_dir:
        hf = Path(cfg.model.hf_dir)
        if not hf.exists():
            raise UserError(f"model.hf_dir: {hf} does not exist")
        if not hf.is_dir():
            raise UserError(f"model.hf_dir: {hf} is a file; give the model's directory (config.json + *.safetensors)")
        if not (hf / "config.json").is_file():
            raise UserError(f"model.hf_dir: no config.json in {hf} (not a Hugging Face model directory)")
    elif cfg.warmstart is None:
        raise UserError("model.hf_dir is empty and there is no warmstart section: name a HF checkpoint")
    if cfg.model.mcore_dir and not Path(cfg.model.mcore_dir).is_dir():
        raise UserError(f"model.mcore_dir: {cfg.model.mcore_dir} is not a directory (tools/convert_hf_to_mcore.py "
                        "writes one)")
    generated = cfg.warmstart is not None and cfg.warmstart.task_max_operand > 0 and not cfg.model.hf_dir
    for key, section in (("data.path", cfg.data), ("eval_data.path", cfg.eval_data)):
        if section is not None and not generated and not Path(section.path).exists():
            raise UserError(f"{key}: {section.path} does not exist")


def check_rewards(rewards) -> None:
    """Every term resolves: a registered name with valid kwargs, or a user function that imports."""
    from megatron_gift.rewards.registry import build_reward, reward_names

    for i, term in enumerate(rewards.terms):
        if term.name == "reward_model":
            continue  # loads a model: built with the trainer
        if ":" not in term.name and term.name not in reward_names():
            raise UserError(f"rewards.terms[{i}].name: unknown reward '{term.name}'{nearest(term.name, reward_names())} "
                            f"(valid: {', '.join(reward_names())}, or 'package.module:function')")
        try:
            build_reward(term.name, term.kwargs)
        except ValueError as exc:
            raise UserError(f"rewards.terms[{i}]: {exc}") from None
