"""Smoke test of Megatron-Core on CPU/gloo: a tiny GPTModel's forward + backward at TP=2, PP=2 and DP=2
(two processes each) equals a single-process run of the same weights and batch.

Each layout runs one training step through megatron's own schedule (get_forward_backward_func), DDP
wrapper and finalize_model_grads, with tied input/output embeddings (so PP also exercises the
embedding-group gradient all-reduce). The single-process reference runs the whole batch as one
microbatch; the PP run uses two microbatches, so microbatch-count invariance is covered too.
Weights: the reference initialises (use_cpu_initialization, seeded); every layout loads those exact
tensors (TP shards sliced along each parameter's partition_dim, PP layers renamed to global indices).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
import torch

from megatron_gift.mcore.testing.harness import run_distributed

from tests.distributed.tiny_gpt import (  # noqa: F401  (shared with the schedule tests)
    ATOL, BATCH, HEADS, HIDDEN, LAYERS, RTOL, SEQ, VOCAB, _assemble_grads, _build_model, _config, _global_name,
    _load, _rank_grads, _tp_dim,
)


def _train_step(rank: int, world_size: int, tokens: torch.Tensor, labels: torch.Tensor,
                num_microbatches: int, weights: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """One forward+backward on this rank's share of the batch; returns logits, grads and coordinates."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    config = _config()
    model = _build_model(config)
    reference = weights is None
    if reference:
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    else:
        _load(model, weights)
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tok, lab = tokens.chunk(dp)[dp_rank], labels.chunk(dp)[dp_rank]
    micro = list(zip(tok.chunk(num_microbatches), lab.chunk(num_microbatches)))
    positions = torch.arange(SEQ).unsqueeze(0)
    logits_seen: List[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        mb_tokens, mb_labels = next(data_iterator)
        output = chunk(mb_tokens, positions.expand_as(mb_tokens), None)

        def loss_func(logits):
            logits_seen.append(logits.detach().clone())
            # vocab_parallel_cross_entropy works in place on its input: give it a copy.
            loss = vocab_parallel_cross_entropy(logits.clone(), mb_labels).mean()
            return loss, {"loss": loss.detach().clone()}
        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
        num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=tok.shape[0] // num_microbatches)
    grads = _rank_grads(model)
    return dict(logits=torch.cat(logits_seen) if logits_seen else None, grads=grads,
                weights=weights if reference else None, tp_rank=ps.get_tensor_model_parallel_rank(),
                dp_rank=dp_rank, pp_rank=ps.get_pipeline_model_parallel_rank())


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g))


@pytest.fixture(scope="module")
def reference(batch):
    return run_distributed(_train_step, 1, tokens=batch[0], labels=batch[1], num_microbatches=1)[0]


def _assemble_logits(results: List[Dict[str, Any]]) -> torch.Tensor:
    """Full [batch, seq, vocab] logits: vocab shards concatenated per DP rank, DP slices along the batch."""
    with_logits = [r for r in results if r["logits"] is not None]
    by_dp: Dict[int, List[torch.Tensor]] = {}
    for r in sorted(with_logits, key=lambda r: (r["dp_rank"], r["tp_rank"])):
        by_dp.setdefault(r["dp_rank"], []).append(r["logits"])
    return torch.cat([torch.cat(v, dim=-1) for _, v in sorted(by_dp.items())], dim=0)


LAYOUTS = {"tp2": dict(tp=2), "pp2": dict(pp=2), "dp2": dict()}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, batch, reference):
    sizes = LAYOUTS[layout]
    results = run_distributed(_train_step, 2, **sizes, tokens=batch[0], labels=batch[1],
                              num_microbatches=2 if sizes.get("pp", 1) > 1 else 1,
                              weights=reference["weights"])
    ref_logits = reference["logits"]
    assert ref_logits.shape == (BATCH, SEQ, VOCAB) and ref_logits.abs().max() > 0.1
    torch.testing.assert_close(_assemble_logits(results), ref_logits, atol=ATOL, rtol=RTOL)

    grads = _assemble_grads(results)
    assert set(grads) == set(reference["grads"]), "parameters missing or extra in the parallel layout"
    for name, (_, ref_grad) in reference["grads"].items():
        assert ref_grad.abs().max() > 0, f"reference gradient of {name} is zero: test cannot fail"
        torch.testing.assert_close(grads[name], ref_grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
