"""Run config: YAML + --set overrides, unknown keys with the nearest valid one, bad values, impossible layouts."""
import pytest
from megatron_gift.config.schema import apply_overrides, load_yaml
from megatron_gift.config.run import load_run_config, run_config_from_dict

BASE = {"model": {"hf_dir": "/x"}, "data": {"path": "/x/train.jsonl"}}


def test_example_config_loads_and_overrides_apply():
    cfg = load_run_config("examples/tiny_cpu.yaml", ["trainer.steps=3", "loss.name=grpo", "loss.options={}",
                                                     "rollout.sampling.temperature=0.7"])
    assert (cfg.trainer.steps, cfg.loss.name, cfg.rollout.sampling.temperature) == (3, "grpo", 0.7)
    assert cfg.data.path.endswith("megatron_gift/data/builtin/arithmetic/train.jsonl")  # resolved next to the YAML
    assert cfg.warmstart is not None and cfg.warmstart.steps > 0


def test_unknown_section_and_key_name_the_nearest():
    with pytest.raises(ValueError, match=r"unknown section 'trainr'.*did you mean 'trainer'"):
        run_config_from_dict({**BASE, "trainr": {}})
    with pytest.raises(ValueError, match=r"unknown key 'stpes' in run config.trainer; did you mean 'steps'"):
        run_config_from_dict({**BASE, "trainer": {"stpes": 3}})
    with pytest.raises(ValueError, match=r"unknown key 'bta'.*did you mean 'beta'"):
        run_config_from_dict({**BASE, "loss": {"name": "gift", "options": {"bta": 1}}})
    with pytest.raises(ValueError, match=r"unknown loss 'gfit'; did you mean 'gift'"):
        run_config_from_dict({**BASE, "loss": {"name": "gfit"}})


def test_wrong_types_and_values():
    with pytest.raises(ValueError, match=r"trainer.steps must be an int >= 1, got 'ten'"):
        run_config_from_dict({**BASE, "trainer": {"steps": "ten"}})
    with pytest.raises(ValueError, match=r"sampling.temperature"):
        run_config_from_dict({**BASE, "rollout": {"sampling": {"temperature": -1}}})
    with pytest.raises(ValueError, match=r"parallel.sequence_parallel needs parallel.tp > 1"):
        run_config_from_dict({**BASE, "parallel": {"sequence_parallel": True}})


def test_impossible_layouts_are_named():
    cfg = run_config_from_dict({**BASE, "parallel": {"tp": 2, "pp": 2}, "trainer": {"prompts_per_step": 8}})
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"):
        cfg.check_world(6)
    assert cfg.check_world(8) == 2
    cfg = run_config_from_dict({**BASE, "trainer": {"prompts_per_step": 6, "microbatches": 2}})
    with pytest.raises(ValueError, match=r"6 prompt groups per optimizer step cannot be split .* 2 data-parallel ranks x 2"):
        cfg.check_world(2)


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["trainer.steps"])
    with pytest.raises(ValueError, match="'steps' is a value, not a section"):
        apply_overrides({"trainer": {"steps": 1}}, ["trainer.steps.x=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_yaml(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    # YAML 1.1 leaves 1e-4 a string; overrides still give a float.
    assert apply_overrides({}, ["optim.lr=1e-4", "x=abc"]) == {"optim": {"lr": 1e-4}, "x": "abc"}
