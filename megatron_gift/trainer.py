"""The GIFT training loop: one method per phase of a step, timed.

Owns the order of a step (DESIGN.md "One training step"): sample prompts -> generate N responses per
prompt (replica leader's rollout engine) -> score -> pack whole groups -> anchor log-probs -> GIFT (or
GRPO) forward-backward and optimizer step -> push weights to the engine -> log. Each data-parallel
replica samples the same global prompt batch from the same sampler state and keeps its own share, so
the sampler position is identical on every rank. Checkpointing and resume belong to the long-run issue.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_gift.algo import build_loss, check_loss_inputs
from megatron_gift.algo.packing import RolloutGroup, pack_microbatches, shard_groups
from megatron_gift.checkpoint.hf_arch import load_hf_arch
from megatron_gift.config import write_resolved
from megatron_gift.data import PromptSampler, build_prompt_dataset, load_tokenizer
from megatron_gift.mcore import runtime as rt_mod
from megatron_gift.mcore.precision import check_fp8_supported, transformer_precision_kwargs
from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
from megatron_gift.mcore.training import build_optimizer, wrap_for_training
from megatron_gift.mcore.weight_sync import iter_policy_as_hf, unwrap as unwrap_model
from megatron_gift.metrics_log import MetricsLog
from megatron_gift.rewards import build_rewards
from megatron_gift.run_config import RunConfig


class Trainer:
    """Build everything from a RunConfig on this rank, then `run()` the configured number of steps."""

    def __init__(self, cfg: RunConfig, log=print):
        self.cfg, self.log_fn = cfg, log
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.rt = rt_mod.start(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.vpp, seed=t.seed)
        cfg.check_world(self.rt.world_size)
        check_fp8_supported(cfg.precision)
        self.timers: Dict[str, float] = {}
        self._prepare_model_dir()
        self.tokenizer = load_tokenizer(cfg.model.hf_dir)
        self.dataset = build_prompt_dataset(cfg.data, self.tokenizer)
        self.sampler = PromptSampler(self.dataset, seed=t.seed)
        self.rewards = build_rewards(cfg.rewards) if self.rt.is_leader else None
        self.eval_set = None
        if cfg.eval_data is not None and t.eval_every > 0:
            self.eval_set = build_prompt_dataset(cfg.eval_data, self.tokenizer)
        self.loss = build_loss(cfg.loss.name, cfg.loss.options)
        self._build_models()
        self.engine = self._build_engine() if self.rt.is_leader else None
        self.metrics = MetricsLog(self.run_dir) if self.rt.is_logger else None
        self.step = 0
        if self.rt.is_logger:
            write_resolved(cfg, self.run_dir / "config.resolved.yaml")

    # ----- set-up -----------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.rt.is_logger:
            self.log_fn(msg)

    def _prepare_model_dir(self) -> None:
        """Warm-start the tiny demo model (rank 0 makes it, the others wait) when no hf_dir is given."""
        cfg = self.cfg
        if cfg.model.hf_dir:
            return
        if cfg.warmstart is None:
            raise ValueError("model.hf_dir is empty and there is no warmstart section: name a HF checkpoint")
        from megatron_gift.data import make_arithmetic_dataset
        from megatron_gift.data.builtin import builtin_arithmetic_paths
        from megatron_gift.warmstart import make_warmstart_model
        ws = cfg.warmstart
        if ws.task_max_operand > 0:
            paths = {k: str(self.run_dir / "data" / f"{k}.jsonl") for k in ("train", "eval")}
            if self.rt.rank == 0:
                make_arithmetic_dataset(str(self.run_dir / "data"), ws.task_n_train, ws.task_n_eval, seed=ws.seed,
                                        max_operand=ws.task_max_operand)
            cfg.data.path = paths["train"]
            if cfg.eval_data is not None:
                cfg.eval_data.path = paths["eval"]
        out = str(self.run_dir / "warmstart")
        if self.rt.rank == 0:
            make_warmstart_model(ws, cfg.data, builtin_arithmetic_paths()["tokenizer"], out, log=self.say)
        dist.barrier()
        cfg.model.hf_dir = out

    def _build_models(self) -> None:
        cfg = self.cfg
        self.arch = load_hf_arch(Path(cfg.model.hf_dir) / "config.json")
        kwargs = dict(arch=self.arch, hf_dir=cfg.model.hf_dir, mcore_dir=cfg.model.mcore_dir,
                      dtype=cfg.precision.torch_dtype, vocab_multiple=cfg.model.vocab_multiple, device=self.rt.device)
        extra = {k: v for k, v in transformer_precision_kwargs(cfg.precision).items() if k.startswith("fp8")}
        if cfg.parallel.sequence_parallel:
            extra["sequence_parallel"] = True
        policy = rt_mod.build_stage_model(**kwargs, **extra)
        self.reference = None
        if self.loss.anchor == "ref" or getattr(self.loss, "needs_ref_logprobs", False):
            self.reference = rt_mod.build_stage_model(**kwargs, **extra).requires_grad_(False).eval()
        cfg.optim.bf16 = cfg.precision.dtype == "bfloat16"
        cfg.optim.use_distributed_optimizer = cfg.parallel.use_distributed_optimizer
        self.model = wrap_for_training([policy], cfg.optim, self.rt.pg)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, self.rt.pg)
        settings = ScheduleSettings(vocab_size=self.arch.vocab_size, temperature=cfg.rollout.sampling.temperature or 1.0,
                                    mode=cfg.loss.schedule)
        self.schedule = GiftSchedule(self.model, self.loss, settings, self.rt.pg)

    def _build_engine(self):
        from megatron_gift.rollout.vllm_config import VllmConfig
        from megatron_gift.rollout.vllm_engine import VllmEngine
        engine_cfg = dict(self.cfg.rollout.engine)
        engine_cfg.setdefault("seed", self.cfg.trainer.seed)
        return VllmEngine(VllmConfig(model=self.cfg.model.hf_dir, **engine_cfg))

    @contextmanager
    def timed(self, phase: str):
        start = time.perf_counter()
        yield
        self.timers[phase] = self.timers.get(phase, 0.0) + time.perf_counter() - start

    # ----- the phases -------------------------------------------------------------------------------
    def sample_prompts(self):
        """The global prompt batch (same on every rank) and this replica's share of it."""
        batch = self.sampler.next_batch(self.cfg.trainer.prompts_per_step)
        per = len(batch) // self.rt.dp
        return batch, batch[self.rt.dp_rank * per:(self.rt.dp_rank + 1) * per], self.rt.dp_rank * per

    def generate_and_score(self, records, first_id: int) -> List[RolloutGroup]:
        """Leader: N responses per prompt and their rewards; broadcast to the replica's ranks."""
        groups = None
        if self.rt.is_leader:
            n = self.cfg.trainer.responses_per_prompt
            with self.timed("generate"):
                result = self.engine.generate([r.prompt_ids for r in records], n, self.cfg.rollout.sampling,
                                              seed=self.cfg.trainer.seed * 1_000_003 + self.step * 131 + first_id)
            with self.timed("score"):
                flat = result.flat()
                texts = [self.tokenizer.decode(ids) for ids in flat.response_token_ids]
                prompts = [records[p].text for p in flat.prompt_index]
                meta = [records[p].reward_metadata() for p in flat.prompt_index]
                scored = self.rewards.score(prompts, texts, meta)
                self._reward_terms = {k: sum(v) / len(v) for k, v in scored.terms.items()}
                groups = result.to_groups(torch.tensor(scored.total, dtype=torch.float32),
                                          group_ids=[first_id + p for p in range(len(records))])
                self._tokens = result.num_response_tokens
        return rt_mod.broadcast_in_replica(groups, self.rt)

    def pack(self, groups: List[RolloutGroup]):
        t = self.cfg.trainer
        mbs = pack_microbatches(groups, num_microbatches=t.microbatches, uniform_length=self.cfg.parallel.pp > 1,
                                pad_id=self.tokenizer.pad_token_id or 0)
        for mb in mbs:
            check_loss_inputs(mb.loss_inputs, expected_sizes=mb.group_sizes)
            mb.to(self.rt.device)
        return mbs

    def anchor(self, mbs) -> None:
        with self.timed("anchor"):
            model = [self.reference] if self.loss.anchor == "ref" else self.model
            self.schedule.fill_anchor_logprobs(model, mbs)
            if getattr(self.loss, "needs_ref_logprobs", False):
                for mb, lp in zip(mbs, self.schedule.compute_logprobs([self.reference], mbs)):
                    mb.loss_inputs.ref_logprobs = lp * mb.loss_inputs.mask

    def train(self, mbs):
        with self.timed("train"):
            result = self.schedule.train_step(mbs, self.optimizer)
            self.scheduler.step(1)
        return result

    def sync_weights(self) -> None:
        with self.timed("weight_sync"):
            stream = iter_policy_as_hf(self.model, self.arch)
            if self.engine is not None:
                self.engine.update_weights(stream)
            else:
                for _ in stream:
                    pass

    def evaluate(self) -> Dict[str, float]:
        """Greedy reward on the first eval prompts (replica 0's engine; the same on every replica)."""
        if self.eval_set is None or not (self.rt.is_leader and self.rt.dp_rank == 0):
            return {}
        with self.timed("eval"):
            records = [self.eval_set[i] for i in range(min(self.cfg.trainer.eval_prompts, len(self.eval_set)))]
            outs = self.engine.greedy([r.prompt_ids for r in records], self.cfg.rollout.sampling.max_new_tokens)
            scores = self.rewards.score([r.text for r in records], [self.tokenizer.decode(o) for o in outs],
                                        [r.reward_metadata() for r in records]).total
        return {"eval/reward_mean": sum(scores) / len(scores)}

    def verify_weight_sync(self, num_prompts: int = 4, max_new_tokens: int = 12) -> float:
        """Fraction of prompts whose greedy continuation from the engine equals the trainer model's.

        A sanity check of the weight sync (DESIGN contract); single-stage, single-TP layouts only.
        """
        if self.cfg.parallel.tp * self.cfg.parallel.pp * self.cfg.parallel.cp != 1:
            raise NotImplementedError("verify_weight_sync compares against a single-stage model (tp=pp=cp=1)")
        prompts = [self.dataset[i].prompt_ids for i in range(min(num_prompts, len(self.dataset)))]
        engine_out = self.engine.greedy(prompts, max_new_tokens)
        model = unwrap_model(self.model[0]).eval()
        matches = 0
        with torch.no_grad():
            for prompt, theirs in zip(prompts, engine_out):
                ours = _megatron_greedy(model, prompt, len(theirs), self.arch.vocab_size, self.rt.device)
                matches += int(ours == list(theirs))
        model.train()
        return matches / len(prompts)

    # ----- the loop ---------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        self.timers, t0 = {}, time.perf_counter()
        _, mine, first_id = self.sample_prompts()
        groups = self.generate_and_score(mine, first_id)
        per_update = len(groups) // self.cfg.trainer.updates_per_rollout
        rewards = torch.cat([g.rewards for g in groups])
        # Anchors for every update of this rollout batch come first: with anchor `old` they are the
        # policy that generated the rollouts (before the batch's first update).
        batches = [self.pack(groups[u * per_update:(u + 1) * per_update])
                   for u in range(self.cfg.trainer.updates_per_rollout)]
        for mbs in batches:
            self.anchor(mbs)
        values: Dict[str, float] = {}
        for mbs in batches:
            result = self.train(mbs)
            values.update(result.values())
            values["grad_norm"] = float(result.grad_norm) if result.grad_norm is not None else float("nan")
        self.sync_weights()
        self.step += 1
        return self._step_metrics(values, rewards, time.perf_counter() - t0)

    def _step_metrics(self, values, rewards, wall: float) -> Dict[str, float]:
        stats = torch.stack([rewards.sum(), (rewards ** 2).sum(), torch.tensor(float(rewards.numel()))]).double()
        dist.all_reduce(stats, group=self.rt.pg.dp)
        mean = float(stats[0] / stats[2])
        values.update(reward_mean=mean, reward_std=max(0.0, float(stats[1] / stats[2]) - mean ** 2) ** 0.5,
                      lr=self.optimizer.param_groups[0]["lr"], step_time_s=wall)
        if self.rt.is_leader:
            values.update({f"reward/{k}": v for k, v in self._reward_terms.items()})
            values["tokens_per_s"] = self._tokens / max(wall, 1e-9)
        values.update({f"time/{k}_s": v for k, v in self.timers.items()})
        return values

    def run(self) -> List[Dict[str, float]]:
        history = []
        total = self.cfg.trainer.steps
        self.say(f"[train] {total} steps, {self.cfg.trainer.prompts_per_step} prompts x "
                 f"{self.cfg.trainer.responses_per_prompt} responses, loss {self.cfg.loss.name}, world {self.rt.world_size}")
        every = self.cfg.trainer.eval_every
        if self.eval_set is not None and self.step == 0:
            start = self.evaluate()
            if start:
                self.say(f"[eval] step 0 greedy reward {start['eval/reward_mean']:.3f}")
                if self.metrics is not None:
                    self.metrics.log(0, start)
        while self.step < total:
            values = self.train_step()
            if self.eval_set is not None and (self.step % every == 0 or self.step == total):
                values.update(self.evaluate())
            history.append(values)
            if self.metrics is not None:
                self.metrics.log(self.step, values)
            if self.step % self.cfg.trainer.log_every == 0 or self.step == total:
                ev = f" eval {values['eval/reward_mean']:.3f}" if "eval/reward_mean" in values else ""
                self.say(f"[train] step {self.step}/{total} reward {values['reward_mean']:.3f}{ev} "
                         f"loss {values.get('loss', float('nan')):.4f} time {values['step_time_s']:.1f}s "
                         + " ".join(f"{k[5:-2]}={v:.1f}s" for k, v in values.items() if k.startswith("time/")))
        return history

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None:
            self.engine.close()
        self.rt.close()


def _megatron_greedy(model, prompt, steps: int, vocab: int, device) -> list:
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens], device=device)
        logits = model(ids, torch.arange(len(tokens), device=device)[None], None)
        tokens.append(int(logits[0, -1, :vocab].argmax()))
    return tokens[len(prompt):]
