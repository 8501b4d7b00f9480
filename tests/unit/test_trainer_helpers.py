"""Small pure helpers the trainer uses: the step line's progress bar, the run dir's HF -> Megatron conversion."""


def test_progress_bar_of_the_step_line():
    from megatron_gift.trainer.report import progress_bar
    assert progress_bar(0, 50) == "[--------------------]   0%"
    assert progress_bar(10, 40) == "[#####---------------]  25%"
    assert progress_bar(50, 50) == "[####################] 100%"
    assert progress_bar(3, 0) == "[####################] 100%"


def test_conversion_for_model_parallel_reuses_its_own_and_refuses_another(tmp_path):
    """TP / PP > 1 without model.mcore_dir: the run dir's conversion is reused only if it is of this model."""
    import json

    import pytest

    from megatron_gift.mcore.convert import convert_for_model_parallel
    out = tmp_path / "mcore_from_hf"
    out.mkdir()
    info = {"format_version": 1, "source": str((tmp_path / "hf").absolute()), "dtype": "float32", "vocab_multiple": 128}
    (out / "megatron_gift_conversion.json").write_text(json.dumps(info))
    said = []
    convert_for_model_parallel(str(tmp_path / "hf"), out, "float32", 128, log=said.append)  # nothing to do
    assert said and "reusing" in said[0]
    with pytest.raises(ValueError, match="holds a conversion of .*hf \\(float32, vocab multiple 128\\), not of .*other"):
        convert_for_model_parallel(str(tmp_path / "other"), out, "float32", 128, log=said.append)
    with pytest.raises(ValueError, match="not of .*bfloat16"):
        convert_for_model_parallel(str(tmp_path / "hf"), out, "bfloat16", 128, log=said.append)


def test_step_line_and_eta_clock():
    from megatron_gift.trainer.report import EtaClock, step_line
    now = [100.0]
    clock = EtaClock(first_step=2, clock=lambda: now[0])
    now[0] += 30.0  # two steps (3 and 4) in 30 s: 15 s a step, 6 to go
    assert clock.eta(4, 10) == "1m30s"
    line = step_line(4, 10, {"reward_mean": 0.25, "loss": -0.5, "step_time_s": 15.0, "time/generate_s": 9.0,
                             "eval/reward_mean": 0.5}, clock.eta(4, 10))
    assert line == ("[train] step 4/10 [########------------]  40% reward 0.250 eval 0.500 loss -0.5000 time 15.0s "
                    "eta 1m30s generate=9.0s")


def test_checkpointer_parts_must_be_stateful():
    import pytest

    from megatron_gift.trainer.checkpointing import Stateful, TrainingCheckpointer

    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    assert isinstance(Counter(), Stateful) and not isinstance(object(), Stateful)
    TrainingCheckpointer(None, [], None, {"counter": Counter()}, {}, rank=0)
    with pytest.raises(TypeError, match="checkpoint part 'sampler' must have state_dict"):
        TrainingCheckpointer(None, [], None, {"sampler": object()}, {}, rank=0)
    with pytest.raises(TypeError, match="'step'"):  # the step is the checkpoint's own key
        TrainingCheckpointer(None, [], None, {"step": Counter()}, {}, rank=0)
