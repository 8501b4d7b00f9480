"""Independent float64 per-token loops for the PPO-style baselines (written from verl's core_algos.py
and the GRPO / DAPO / GSPO papers, sharing no code with megatron_gift.algo)."""
from __future__ import annotations

import math

import torch


def group_advantages(rewards, sizes, eps=1e-6, scale=True):
    out, start = [], 0
    for n in sizes:
        r = [float(x) for x in rewards[start:start + n]]
        if n == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(r) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in r) / (n - 1))
        out += [((x - mean) / (std + eps)) if scale else (x - mean) for x in r]
        start += n
    return out


def kl_token(lp, ref, estimator):
    log_r = lp - ref
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    d = torch.clamp(-log_r, -20.0, 20.0)
    return torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)


def ppo_token(lp, old, adv, clip_low, clip_high, clip_c, clamp=20.0):
    ratio = torch.exp(torch.clamp(lp - old, -clamp, clamp))
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if clip_c is not None and adv < 0:
        loss = torch.minimum(loss, torch.tensor(-adv * clip_c, dtype=lp.dtype))
    return loss


def aggregate(per_seq_terms, mode):
    """per_seq_terms: one list of token loss terms per sequence (possibly empty)."""
    if mode == "token-mean":
        terms = [t for seq in per_seq_terms for t in seq]
        return sum(terms) / len(terms)
    if mode == "seq-mean-token-mean":
        return sum((sum(s) / len(s)) if s else 0.0 for s in per_seq_terms) / len(per_seq_terms)
    return sum(sum(s) if s else 0.0 for s in per_seq_terms) / len(per_seq_terms)


def reference_grpo(logprobs, inputs, sizes, clip_low=0.2, clip_high=0.2, clip_c=3.0, mode="token-mean",
                   kl_coef=0.0, estimator="k3", eps=1e-6, scale=True, skip_groups=()):
    adv = group_advantages(inputs.rewards, sizes, eps, scale)
    seqs, start = [], 0
    for g, n in enumerate(sizes):
        for i in range(start, start + n):
            if g in skip_groups:
                continue
            terms = []
            for t in range(logprobs.shape[1]):
                if inputs.mask[i, t] == 0:
                    continue
                term = ppo_token(logprobs[i, t], inputs.anchor_logprobs[i, t], adv[i], clip_low, clip_high, clip_c)
                if kl_coef:
                    term = term + kl_coef * kl_token(logprobs[i, t], inputs.ref_logprobs[i, t], estimator)
                terms.append(term)
            seqs.append(terms)
        start += n
    return aggregate(seqs, mode)


def reference_gspo(logprobs, inputs, sizes, clip_low=3e-4, clip_high=4e-4, eps=1e-6):
    """The paper's sequence objective: mean_i max(-A_i s_i, -A_i clip(s_i)), s_i = exp(mean_t log r_it)."""
    adv = group_advantages(inputs.rewards, sizes, eps)
    total = 0.0
    for i in range(logprobs.shape[0]):
        log_r = [logprobs[i, t] - inputs.anchor_logprobs[i, t] for t in range(logprobs.shape[1]) if inputs.mask[i, t]]
        if not log_r:
            continue
        s = torch.exp(sum(log_r) / len(log_r))
        total = total + torch.maximum(-adv[i] * s, -adv[i] * torch.clamp(s, 1 - clip_low, 1 + clip_high))
    return total / logprobs.shape[0]
