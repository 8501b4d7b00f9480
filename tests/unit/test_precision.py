"""Precision / FP8 settings map onto Megatron's TransformerConfig; FP8 that cannot run is a clear error."""
import pytest
import torch

from megatron_gift.mcore.precision import PrecisionConfig, check_fp8_supported, transformer_precision_kwargs


def test_bf16_without_fp8():
    kw = transformer_precision_kwargs(PrecisionConfig(dtype="bfloat16"))
    assert kw["bf16"] and not kw["fp16"] and kw["params_dtype"] is torch.bfloat16 and "fp8" not in kw
    check_fp8_supported(PrecisionConfig())  # no FP8 requested: nothing to check


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_fields_are_accepted_by_transformer_config(recipe):
    from megatron.core.transformer import TransformerConfig
    cfg = PrecisionConfig(dtype="bfloat16", fp8="hybrid", fp8_recipe=recipe, fp8_amax_history_len=16)
    kw = transformer_precision_kwargs(cfg)
    tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **kw)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.bf16) == ("hybrid", recipe, 16, True)


def test_fp8_without_transformer_engine_names_the_fix():
    with pytest.raises(RuntimeError, match=r"needs Transformer Engine.*precision.fp8: null"):
        check_fp8_supported(PrecisionConfig(fp8="e4m3"), te_importable=lambda: False)


def test_fp8_recipe_needs_a_recent_gpu():
    ok = lambda: True  # noqa: E731
    check_fp8_supported(PrecisionConfig(fp8="e4m3"), te_importable=ok, capability=(9, 0))
    with pytest.raises(RuntimeError, match=r"'mxfp8' needs compute capability >= 10.0; this GPU has 9.0"):
        check_fp8_supported(PrecisionConfig(fp8="e4m3", fp8_recipe="mxfp8"), te_importable=ok, capability=(9, 0))
    with pytest.raises(RuntimeError, match=r"'delayed' needs compute capability >= 8.9; this GPU has 8.0"):
        check_fp8_supported(PrecisionConfig(fp8="e4m3"), te_importable=ok, capability=(8, 0))


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="fp8_recipe 'fast'"):
        PrecisionConfig(fp8="e4m3", fp8_recipe="fast")
    with pytest.raises(ValueError, match="fp8 'e5m2'"):
        PrecisionConfig(fp8="e5m2")
    with pytest.raises(ValueError, match="needs dtype bfloat16 or float16"):
        PrecisionConfig(dtype="float32", fp8="e4m3")
