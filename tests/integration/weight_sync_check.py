"""Test-only check of the trainer's weight sync: the engine's greedy continuations equal the trained model's."""
from __future__ import annotations

import torch

from megatron_gift.mcore.weight_sync import unwrap as unwrap_model


def verify_weight_sync(trainer, num_prompts: int = 4, max_new_tokens: int = 12) -> float:
    """Fraction of prompts whose greedy continuation from the trainer's engine equals its model's.

    Single-stage, single-TP layouts only (the model is run whole on this rank).
    """
    par = trainer.cfg.parallel
    if par.tp * par.pp * par.cp * par.ep * par.etp != 1:
        raise NotImplementedError("verify_weight_sync compares against a single-stage model (tp=pp=cp=ep=etp=1)")
    prompts = [trainer.dataset[i].prompt_ids for i in range(min(num_prompts, len(trainer.dataset)))]
    engine_out = trainer.engine.greedy(prompts, max_new_tokens)
    model = unwrap_model(trainer.model[0]).eval()
    matches = 0
    with torch.no_grad():
        for prompt, theirs in zip(prompts, engine_out):
            ours = megatron_greedy(model, prompt, len(theirs), trainer.arch.vocab_size, trainer.rt.device)
            matches += int(ours == list(theirs))
    model.train()
    return matches / len(prompts)


def megatron_greedy(model, prompt, steps: int, vocab: int, device) -> list:
    """Greedy decoding with the full (unsharded) Megatron model, recomputing the whole prefix each token."""
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens], device=device)
        logits = model(ids, torch.arange(len(tokens), device=device)[None], None)
        tokens.append(int(logits[0, -1, :vocab].argmax()))
    return tokens[len(prompt):]
