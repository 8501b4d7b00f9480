"""Token log-probs from (vocab-sharded) logits: padding rows excluded, temperature, gradient (float64)."""
import pytest
import torch

from megatron_gift.mcore.logprobs import vocab_parallel_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_rank_matches_log_softmax_over_true_vocab(temperature):
    gen = torch.Generator().manual_seed(0)
    vocab, padded = 50, 64
    logits = torch.randn(3, 7, padded, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randint(0, vocab, (3, 7), generator=gen)
    ours = vocab_parallel_logprobs(logits, target, vocab_size=vocab, temperature=temperature)
    ref = torch.log_softmax(logits[..., :vocab] / temperature, -1).gather(-1, target[..., None])[..., 0]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(3, 7, dtype=torch.float64, generator=gen)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.all(g_ours[..., vocab:] == 0)


def test_input_not_modified_and_bad_temperature():
    logits = torch.randn(2, 3, 8)
    before = logits.clone()
    vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), vocab_size=8)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), vocab_size=8, temperature=0.0)


def test_undo_cp_split_inverts_megatron_cp_slicing():
    from megatron_gift.mcore.schedule import _undo_cp_split
    full = torch.arange(2 * 24).reshape(2, 24).float()
    for cp in (2, 3):
        chunks = full.view(2, 2 * cp, -1)
        parts = [torch.cat([chunks[:, r], chunks[:, 2 * cp - 1 - r]], dim=1) for r in range(cp)]
        assert torch.equal(_undo_cp_split(parts, 24), full)
