"""The GIFT training loop: one method per phase of a step, timed.

Owns the order of a step (DESIGN.md "One training step"): sample prompts -> generate N responses per
prompt -> score -> pack whole groups -> anchor log-probs -> GIFT (or GRPO) forward-backward and optimizer
step -> push weights to the engines -> log. Every rank samples the same global prompt batch from the same
sampler state, so the sampler position is identical everywhere. Every rank hosts a colocated vLLM engine
(or a tensor-parallel share of one, rollout/colocated.py): each engine generates and scores a slice of
the global batch, and each data-parallel replica then trains on its own share of the scored groups.
Rollout seeds depend on (seed, step, position in the global batch) only, so the samples do not depend on
the layout (how many engines split the batch).

Long runs: a checkpoint every `trainer.save_every` steps, at the end and when a stop is requested (signal
or wall-clock budget, agreed by all ranks after each step, resilience.py); `trainer.resume` picks what to
start from (checkpoint/manager.py). A checkpoint holds what makes the continuation bitwise identical on
CPU: weights, optimizer, LR schedule, sampler position, step, every rank's RNG states and the metrics
history (trainer_checkpoint.py). The engines need only the weights, pushed to them right after loading.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_gift.algo import build_loss, check_loss_inputs
from megatron_gift.algo.packing import RolloutGroup, pack_microbatches
from megatron_gift.checkpoint import manager as ckpt_files
from megatron_gift.hf.arch import load_hf_arch
from megatron_gift.config.moe import check_moe_settings, moe_overrides
from megatron_gift.config.schema import write_resolved
from megatron_gift.data import PromptSampler, build_prompt_dataset, load_tokenizer
from megatron_gift.resilience.fault_tolerance import FaultTolerance
from megatron_gift.mcore import dist_ckpt
from megatron_gift.mcore import runtime as rt_mod
from megatron_gift.mcore.convert import convert_for_model_parallel
from megatron_gift.mcore.model import recompute_kwargs
from megatron_gift.mcore.precision import check_fp8_supported, transformer_precision_kwargs
from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
from megatron_gift.mcore.training import build_optimizer, wrap_for_training
from megatron_gift.mcore.weight_sync import iter_policy_as_hf, unwrap as unwrap_model
from megatron_gift.trainer.report import MetricsLog, progress_bar
from megatron_gift.resilience.stop import REQUEUE_FILE, StopRequest
from megatron_gift.rewards import build_rewards
from megatron_gift.rollout.colocated import (EnginePlacement, RolloutStats, balanced_slice, exchange_groups,
                                             sum_over_world)
from megatron_gift.config.run import RunConfig
from megatron_gift.trainer.checkpointing import TrainerCheckpointing


# Steps after (re)start at which ft_launcher's heartbeat timeouts are recomputed from observed intervals.
FT_TIMEOUT_STEPS = 3


def engine_placement(cfg: RunConfig, rank: int, world_size: int) -> EnginePlacement:
    """Where this rank's rollout engine sits (every rank hosts one; see rollout/colocated.py)."""
    return EnginePlacement(rank, world_size, int(cfg.rollout.engine.get("tensor_parallel_size", 1)))


class Trainer(TrainerCheckpointing):
    """Build everything from a RunConfig on this rank, then `run()` the configured number of steps."""

    def __init__(self, cfg: RunConfig, log=print):
        self.cfg, self.log_fn = cfg, log
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.rt = rt_mod.start(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.vpp, seed=t.seed,
                               ep=cfg.parallel.ep, etp=cfg.parallel.etp)
        cfg.check_world(self.rt.world_size)
        self.placement = engine_placement(cfg, self.rt.rank, self.rt.world_size)
        check_fp8_supported(cfg.precision)
        self.timers: Dict[str, float] = {}
        self.ft = FaultTolerance.start(log=self.say)  # heartbeats under ft_launcher; inert otherwise
        self.stop = StopRequest(t.time_budget_s)
        self.stop_reason = None
        self.checkpoints = ckpt_files.CheckpointManager(t.checkpoint_dir, t.keep_last, log=self.say)
        self.resume_from = self.checkpoints.select(t.resume)
        self._prepare_model_dir()
        self.arch = load_hf_arch(Path(cfg.model.hf_dir) / "config.json")
        self.loss = build_loss(cfg.loss.name, cfg.loss.options)
        if self.resume_from is not None:  # before building anything: another model is a clear error, early
            ckpt_files.check_compatible(ckpt_files.read_metadata(self.resume_from)["fingerprint"],
                                        self.fingerprint(), self.resume_from)
        self.tokenizer = load_tokenizer(cfg.model.hf_dir)
        self.dataset = build_prompt_dataset(cfg.data, self.tokenizer)
        self.sampler = PromptSampler(self.dataset, seed=t.seed)
        self.rewards = build_rewards(cfg.rewards) if self.placement.is_engine_leader else None
        self.reward_labels = [term.label for term in cfg.rewards.terms]
        self.eval_set = None
        if cfg.eval_data is not None and t.eval_every > 0:
            self.eval_set = build_prompt_dataset(cfg.eval_data, self.tokenizer)
        self._build_models()
        self.engine = self._build_engine()
        self.async_saver = dist_ckpt.AsyncSaver() if t.async_save else None
        self.step = 0
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self.metrics = None
        if self.rt.is_logger:
            history = self.resume_from / "metrics.jsonl" if self.resume_from is not None else None
            self.metrics = MetricsLog(self.run_dir, resume_step=self.step if history else None, history=history)
            write_resolved(cfg, self.run_dir / "config.resolved.yaml")

    # ----- set-up -----------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.rt.is_logger:
            self.log_fn(msg)

    def _prepare_model_dir(self) -> None:
        """Warm-start the tiny demo model when no hf_dir is given, and convert hf_dir into a Megatron checkpoint
        when TP or PP > 1 needs one and none is given (rank 0 makes both, the others wait)."""
        cfg = self.cfg
        if not cfg.model.hf_dir:
            from megatron_gift.demo.warmstart import point_at_demo_inputs, prepare_demo_inputs
            if self.rt.rank == 0:
                prepare_demo_inputs(cfg, str(self.run_dir), log=self.say)
            dist.barrier()
            if self.rt.rank != 0:
                point_at_demo_inputs(cfg, str(self.run_dir))
        p = cfg.parallel
        check_moe_settings(load_hf_arch(Path(cfg.model.hf_dir) / "config.json"), cfg.model, p)  # before converting
        if self.resume_from is None and not cfg.model.mcore_dir and p.tp * p.pp * p.ep * p.etp > 1:
            out = self.run_dir / "mcore_from_hf"
            if self.rt.rank == 0:
                convert_for_model_parallel(cfg.model.hf_dir, out, cfg.precision.dtype, cfg.model.vocab_multiple,
                                           log=self.say)
            dist.barrier()
            cfg.model.mcore_dir = str(out)

    def _build_models(self) -> None:
        cfg = self.cfg
        kwargs = dict(arch=self.arch, hf_dir=cfg.model.hf_dir, mcore_dir=cfg.model.mcore_dir,
                      dtype=cfg.precision.torch_dtype, vocab_multiple=cfg.model.vocab_multiple, device=self.rt.device)
        extra = {k: v for k, v in transformer_precision_kwargs(cfg.precision).items() if k.startswith("fp8")}
        if cfg.parallel.sequence_parallel:
            extra["sequence_parallel"] = True
        extra.update(recompute_kwargs(cfg.parallel.recompute))
        extra.update(moe_overrides(self.arch, cfg.model))
        if self.resume_from is None:
            policy = rt_mod.build_stage_model(**kwargs, **extra)
        else:  # the checkpoint provides the weights (any layout, no model.mcore_dir needed for the policy)
            policy = dist_ckpt.build_stage_model_unloaded(self.arch, kwargs["dtype"], cfg.model.vocab_multiple,
                                                          self.rt.device, perform_initialization=False, **extra)
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
        dist_ckpt.check_checkpointable(self.model, self.optimizer)  # fail now, not at the first save

    def _build_engine(self):
        """This rank's engine (all ranks build theirs together: vLLM creates its groups over the world)."""
        from megatron_gift.rollout.vllm_config import VllmConfig
        from megatron_gift.rollout.vllm_engine import VllmEngine
        engine_cfg = dict(self.cfg.rollout.engine)
        engine_cfg.setdefault("seed", self.cfg.trainer.seed)
        if self.placement.engine_tp > 1:  # SPMD engines over the trainer's ranks
            engine_cfg.setdefault("distributed_executor_backend", "external_launcher")
        return VllmEngine(VllmConfig(model=self.cfg.model.hf_dir, **engine_cfg))

    @contextmanager
    def timed(self, phase: str):
        self.ft.heartbeat()  # every phase beats: a rank stuck inside one is seen as hung by ft_launcher
        start = time.perf_counter()
        yield
        self.timers[phase] = self.timers.get(phase, 0.0) + time.perf_counter() - start
        self.ft.heartbeat()

    # ----- the phases -------------------------------------------------------------------------------
    def sample_prompts(self):
        """The global prompt batch (the same on every rank)."""
        return self.sampler.next_batch(self.cfg.trainer.prompts_per_step)

    def replica_share(self, num_prompts: int):
        """[start, stop) of the global batch that this rank's data-parallel replica trains on."""
        return balanced_slice(num_prompts, self.rt.dp, self.rt.dp_rank)

    def generate_and_score(self, batch) -> List[RolloutGroup]:
        """Every engine samples N responses for its slice of the batch, its first rank scores them; then each
        replica gets the scored groups of its share (group ids are positions in the global batch)."""
        start, stop = self.placement.share(len(batch))
        records = batch[start:stop]
        local: List[RolloutGroup] = []
        stats = RolloutStats()
        with self.timed("generate"):
            result = self.engine.generate([r.prompt_ids for r in records], self.cfg.trainer.responses_per_prompt,
                                          self.cfg.rollout.sampling, seed=self._rollout_seed(), first_index=start)
        if self.placement.is_engine_leader:
            with self.timed("score"):
                flat = result.flat()
                texts = [self.tokenizer.decode(ids) for ids in flat.response_token_ids]
                scored = self.rewards.score_records([records[p] for p in flat.prompt_index], texts)
                local = result.to_groups(torch.tensor(scored.total, dtype=torch.float32),
                                         group_ids=[start + p for p in range(len(records))])
                stats = RolloutStats(samples=float(len(texts)), tokens=float(result.num_response_tokens),
                                     term_sums={k: float(sum(v)) for k, v in scored.terms.items()})
        with self.timed("exchange"):
            self._rollout_stats = stats.reduced(self.reward_labels, self.rt.device)
            return exchange_groups(local, self.replica_share(len(batch)), self.placement, self.rt.dp)

    def _rollout_seed(self) -> int:
        return self.cfg.trainer.seed * 1_000_003 + self.step * 131

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
        """Every rank's engine gets the full trained weights (gathered over TP, broadcast over PP)."""
        with self.timed("weight_sync"):
            self.engine.update_weights(iter_policy_as_hf(self.model, self.arch))

    def evaluate(self) -> Dict[str, float]:
        """Greedy reward on the first eval prompts, split over every engine; the same value on every rank."""
        if self.eval_set is None:
            return {}
        with self.timed("eval"):
            count = min(self.cfg.trainer.eval_prompts, len(self.eval_set))
            start, stop = self.placement.share(count)
            records = [self.eval_set[i] for i in range(start, stop)]
            outs = self.engine.greedy([r.prompt_ids for r in records],
                                      self.cfg.rollout.sampling.max_new_tokens) if records else []
            total = 0.0
            if self.placement.is_engine_leader and records:
                total = sum(self.rewards.score_records(records, [self.tokenizer.decode(o) for o in outs]).total)
            summed = sum_over_world([total], self.rt.device)[0]
        return {"eval/reward_mean": summed / count}

    def verify_weight_sync(self, num_prompts: int = 4, max_new_tokens: int = 12) -> float:
        """Fraction of prompts whose greedy continuation from the engine equals the trainer model's.

        A sanity check of the weight sync (DESIGN contract); single-stage, single-TP layouts only.
        """
        p = self.cfg.parallel
        if p.tp * p.pp * p.cp * p.ep * p.etp != 1:
            raise NotImplementedError("verify_weight_sync compares against a single-stage model (tp=pp=cp=ep=etp=1)")
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

    def _end_of_step(self, values: Dict[str, float]) -> None:
        """Stop decision (one all-reduce over the world), then a checkpoint if due or a stop was agreed."""
        self.stop.note_step(values["step_time_s"])
        self.stop_reason = self.stop.agree(device=self.rt.device)
        if self.stop_reason is not None or self._save_due():
            self.save_checkpoint()
        if self.async_saver is not None:
            self.async_saver.poll(blocking=False)

    @property
    def requeue_requested(self) -> bool:
        """A stop was agreed before the last step: the job should be requeued (train.py exits with the code)."""
        return self.stop_reason is not None and self.step < self.cfg.trainer.steps

    # ----- the loop ---------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        self.timers, t0 = {}, time.perf_counter()
        groups = self.generate_and_score(self.sample_prompts())
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
        values.update({f"reward/{k}": v for k, v in self._rollout_stats.term_means().items()})
        values["tokens_per_s"] = self._rollout_stats.tokens / max(wall, 1e-9)  # all engines together
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
        self._clear_requeue_file()
        self.stop.install()
        run_start, self._run_clock = self.step, (self.step, time.perf_counter())
        try:
            while self.step < total and self.stop_reason is None:
                values = self.train_step()
                if self.eval_set is not None and (self.step % every == 0 or self.step == total):
                    values.update(self.evaluate())
                history.append(values)
                if self.metrics is not None:
                    self.metrics.log(self.step, values)
                if self.step % self.cfg.trainer.log_every == 0 or self.step == total:
                    self._log_step(values, total)
                self._end_of_step(values)
                if self.step == run_start + FT_TIMEOUT_STEPS:
                    self.ft.calculate_timeouts()  # collective: every rank reaches this step together
        finally:
            self.stop.uninstall()
        if self.async_saver is not None:
            self.async_saver.poll(blocking=True)
        if self.requeue_requested:
            self.ft.request_shutdown(f"stop requested: {self.stop_reason}")  # the job is requeued, not restarted
            self._write_requeue_file()
        return history

    def _log_step(self, values: Dict[str, float], total: int) -> None:
        ev = f" eval {values['eval/reward_mean']:.3f}" if "eval/reward_mean" in values else ""
        self.say(f"[train] step {self.step}/{total} {progress_bar(self.step, total)} reward {values['reward_mean']:.3f}{ev} "
                 f"loss {values.get('loss', float('nan')):.4f} time {values['step_time_s']:.1f}s eta {self._eta(total)} "
                 + " ".join(f"{k[5:-2]}={v:.1f}s" for k, v in values.items() if k.startswith("time/")))

    def _eta(self, total: int) -> str:
        """Remaining wall time at the mean step time of this process's run so far (evals included)."""
        first, t0 = self._run_clock
        done = self.step - first
        seconds = (time.perf_counter() - t0) / max(done, 1) * (total - self.step)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def _clear_requeue_file(self) -> None:
        path = Path(self.cfg.trainer.checkpoint_dir) / REQUEUE_FILE
        if self.rt.rank == 0 and path.exists():
            path.unlink()

    def _write_requeue_file(self) -> None:
        if self.rt.rank == 0:
            self.say(f"[train] stopped after step {self.step} ({self.stop_reason}): checkpoint saved, requeue")
            (Path(self.cfg.trainer.checkpoint_dir) / REQUEUE_FILE).write_text(
                json.dumps({"step": self.step, "reason": self.stop_reason, "time": time.time()}))

    def close(self) -> None:
        if self.async_saver is not None and self.async_saver.pending == 0:
            self.async_saver.close()  # with a save still pending (an error path) waiting could hang: leave it
        dist_ckpt.shutdown_writer_helpers()
        if self.metrics is not None:
            self.metrics.close()
        self.engine.close()
        self.ft.close()
        self.rt.close()


def _megatron_greedy(model, prompt, steps: int, vocab: int, device) -> list:
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens], device=device)
        logits = model(ids, torch.arange(len(tokens), device=device)[None], None)
        tokens.append(int(logits[0, -1, :vocab].argmax()))
    return tokens[len(prompt):]
