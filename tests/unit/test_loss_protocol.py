"""The Loss protocol (algo/loss.py) and the registry shared by losses and rewards (utils/registry.py)."""
import pytest

from megatron_gift.algo import (AnalyticLoss, GIFTLoss, GRPOLoss, Loss, build_loss, has_coefficients,
                                needs_reference_model, register_loss)
from megatron_gift.algo.gift import GIFTConfig
from megatron_gift.utils.registry import Registry


def test_builtin_losses_follow_the_protocol():
    gift_ref, gift_old = build_loss("gift", {"anchor": "ref"}), build_loss("gift", {"anchor": "old"})
    grpo, grpo_kl = build_loss("grpo", {}), build_loss("grpo", {"kl_coef": 0.1})
    assert all(isinstance(x, Loss) for x in (gift_ref, gift_old, grpo, grpo_kl))
    assert isinstance(gift_ref, AnalyticLoss) and has_coefficients(gift_ref)
    assert not isinstance(grpo, AnalyticLoss) and not has_coefficients(grpo)  # no two-pass schedule for GRPO
    assert [needs_reference_model(x) for x in (gift_ref, gift_old, grpo, grpo_kl)] == [True, False, False, True]
    assert grpo_kl.needs_ref_logprobs is True and gift_ref.needs_ref_logprobs is False


def test_a_registered_loss_without_the_protocol_fails_when_built(monkeypatch):
    from megatron_gift.algo import registry
    monkeypatch.setattr(registry._LOSSES, "_entries", dict(registry._LOSSES._entries))  # registrations undone

    class NoAnchor:  # a loss written against the old getattr probing: the anchor silently defaulted
        name, needs_ref_logprobs = "no_anchor", False

        def __init__(self, config):
            self.config = config

        def __call__(self, logprobs, inputs, reduce_seq=None):
            raise AssertionError("never called")

    class BadAnchor(NoAnchor):
        anchor = "previous"

    register_loss("test_no_anchor", NoAnchor, GIFTConfig)
    register_loss("test_bad_anchor", BadAnchor, GIFTConfig)
    with pytest.raises(TypeError, match=r"loss NoAnchor lacks anchor \(the Loss protocol"):
        build_loss("test_no_anchor", {})
    with pytest.raises(TypeError, match=r"anchor is 'previous', not one of \('ref', 'old'\)"):
        build_loss("test_bad_anchor", {})
    with pytest.raises(ValueError, match="loss 'gift' is already registered"):
        register_loss("gift", GIFTLoss, GIFTConfig)
    assert isinstance(GRPOLoss(), Loss)


def test_registry_errors_name_the_kind_and_the_nearest():
    reg = Registry("widget", "widgets", {"alpha": 1, "beta": 2}, hint=", or a path")
    assert reg.get("beta") == 2 and reg.names() == ["alpha", "beta"] and "alpha" in reg
    with pytest.raises(ValueError, match=r"^unknown widget 'alpah'; did you mean 'alpha'\? \(valid widgets: alpha, "
                                         r"beta, or a path\)$"):
        reg.get("alpah")
    reg.register("gamma", 3)
    with pytest.raises(ValueError, match="widget 'gamma' is already registered"):
        reg.register("gamma", 4)


@pytest.mark.parametrize("name, options", [
    ("gift", {}), ("gift", {"skip_zero_variance_groups": True}), ("grpo", {"loss_agg_mode": "token-mean"}),
    ("grpo", {"loss_agg_mode": "seq-mean-token-sum", "skip_zero_variance_groups": True}), ("dapo", {}), ("gspo", {}),
])
def test_loss_count_is_known_before_the_forward_pass(name, options):
    """loss_count (what the MoE aux-loss weight needs up front) equals the count of a real call, with the
    zero-variance group (rewards all 1) dropped where the loss skips it."""

    from megatron_gift.algo.loss import loss_count
    from tests.unit.loss_batches import make_batch
    logprobs, inputs = make_batch([3, 4, 2], seq_len=7, seed=4, rewards=[0, 1, 2, 1, 1, 1, 1, 0, 2])
    if build_loss(name, dict(options)).needs_ref_logprobs:
        inputs.ref_logprobs = inputs.anchor_logprobs - 0.1
    loss = build_loss(name, dict(options))
    real = loss(logprobs, inputs).num_sequences
    expected = {"gift": 9.0, "grpo": float(inputs.mask.sum())}
    assert float(loss_count(loss, inputs)) == float(real)
    if name == "gift":
        assert float(real) == (5.0 if options else 9.0)  # the 4 sequences of group 1 all have reward 1
    elif options.get("loss_agg_mode") == "token-mean":
        assert float(real) == expected["grpo"]
