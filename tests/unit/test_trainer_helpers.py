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
