"""Config values from YAML are read like --set values, and every wrong value is an error naming its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_gift.config.run import load_run_config
from megatron_gift.config.schema import write_resolved

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny_cpu.yaml"


def _yaml(tmp_path, old: str, new: str) -> Path:
    text = TINY.read_text()
    assert old in text
    path = tmp_path / "c.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_yaml_exponent_floats_read_like_set_values(tmp_path):
    cfg = load_run_config(_yaml(tmp_path, "lr: 0.0003", "lr: 3e-4"))  # YAML 1.1 reads '3e-4' as a string
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert load_run_config(TINY, ["optim.lr=3e-4"]).optim.lr == cfg.optim.lr
    assert load_run_config(_yaml(tmp_path, "steps: 50", "steps: 1e2")).trainer.steps == 100
    quoted = load_run_config(_yaml(tmp_path, "lr: 0.0003", "lr: '3e-4'"))  # a float field: coerced like --set
    assert quoted.optim.lr == 3e-4


@pytest.mark.parametrize("override,message", [
    ("optim.lr=abc", "optim.lr must be a number, got 'abc'"),
    ("optim.clip_grad=[1]", "optim.clip_grad must be a number"),
    ("trainer.run_dir=5", "trainer.run_dir must be a string, got 5"),
    ("trainer.async_save=maybe", "trainer.async_save must be true or false"),
    ("trainer.responses_per_prompt=1", "trainer.responses_per_prompt is 1: GIFT and GRPO normalise rewards within"),
    ("trainer.updates_per_rollout=3", "trainer.prompts_per_step=16 must be divisible by trainer.updates_per_rollout=3"),
])
def test_wrong_values_name_the_key(override, message):
    with pytest.raises(ValueError) as exc:
        load_run_config(TINY, [override])
    assert message in str(exc.value)


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("trainer:\n  run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"run config '{path}' is not UTF-8"):
        load_run_config(path)


def test_resolved_config_is_not_replaced_silently(tmp_path):
    notes = []
    out = tmp_path / "config.resolved.yaml"
    write_resolved(load_run_config(TINY), out, log=notes.append)
    first = out.read_text()
    write_resolved(load_run_config(TINY), out, log=notes.append)  # the same config: nothing to say
    assert notes == [] and out.read_text() == first
    write_resolved(load_run_config(TINY, ["trainer.steps=7"]), out, log=notes.append)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("config.resolved.") and p != out]
    assert len(kept) == 1 and kept[0].read_text() == first and "steps: 7" in out.read_text()
    assert len(notes) == 1 and str(kept[0]) in notes[0]


def test_generated_task_says_which_data_paths_it_replaces(tmp_path):
    from megatron_gift.demo.warmstart import replaced_paths_note

    cfg = load_run_config(TINY, [f"data.path={tmp_path / 'mine.jsonl'}"])
    note = replaced_paths_note(cfg, str(tmp_path / "run"))
    assert note.count("\n") == 0 and f"data.path {tmp_path / 'mine.jsonl'} -> {tmp_path / 'run' / 'data'}" in note
    assert "eval_data.path" in note and "task_max_operand: 0" in note
    assert replaced_paths_note(load_run_config(TINY, ["warmstart.task_max_operand=0"]), str(tmp_path)) is None
