"""The GIFT training loop: one method per phase of a step, timed.

Owns the order of a step (docs/architecture.md "One training step"): sample prompts -> generate N responses per
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
history (trainer/checkpointing.py). The engines need only the weights, pushed to them right after loading.

The parts are built by trainer/assembly.py, checkpointed as named stateful parts by
trainer/checkpointing.py and reported by trainer/report.py; this module is the loop. Each phase returns
what it produced (groups and rollout statistics, microbatches, step results) to the step that calls it.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_gift.algo import check_loss_inputs
from megatron_gift.algo.packing import RolloutGroup, pack_microbatches
from megatron_gift.algo.routes import attach_routes
from megatron_gift.checkpoint import manager as ckpt_files
from megatron_gift.config.run import RunConfig
from megatron_gift.config.schema import to_plain, write_resolved
from megatron_gift.mcore import dist_ckpt
from megatron_gift.mcore import runtime as rt_mod
from megatron_gift.mcore.precision import check_fp8_supported
from megatron_gift.mcore.training import step_until_no_overflow
from megatron_gift.mcore.weight_sync import iter_policy_as_hf
from megatron_gift.resilience.fault_tolerance import FaultTolerance
from megatron_gift.resilience.stop import REQUEUE_FILE, StopRequest
from megatron_gift.rewards import build_rewards
from megatron_gift.rollout.colocated import RolloutStats, balanced_slice, exchange_groups, sum_over_world
from megatron_gift.rollout.dynamic_sampling import dynamic_rollout, gather_round
from megatron_gift.trainer import assembly
from megatron_gift.trainer.checkpointing import TrainingCheckpointer, fingerprint, layout
from megatron_gift.trainer.limits import check_trainer_supports
from megatron_gift.trainer.report import EtaClock, MetricsLog, per_update_metrics, step_line
from megatron_gift.trainer.throughput import (fill_rollout_anchor, microbatch_rule, self_anchored, set_engine_asleep,
                                              sleep_note)


# Steps after (re)start at which ft_launcher's heartbeat timeouts are recomputed from observed intervals.
FT_TIMEOUT_STEPS = 3


class PhaseTimer:
    """Wall seconds per phase of the current step; every phase beats ft_launcher's heartbeat at both ends
    (a rank stuck inside one is seen as hung)."""

    def __init__(self, ft: FaultTolerance):
        self.ft, self.seconds = ft, {}

    def reset(self) -> None:
        self.seconds = {}

    @contextmanager
    def __call__(self, phase: str):
        self.ft.heartbeat()
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
        self.ft.heartbeat()


class Trainer:
    """Build everything from a RunConfig on this rank, then `run()` the configured number of steps."""

    def __init__(self, cfg: RunConfig, log=print):
        check_trainer_supports(cfg)  # before anything starts: settings this trainer would otherwise ignore
        self.cfg, self.log_fn = cfg, log
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.rt = rt_mod.start(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.vpp, seed=t.seed,
                               ep=cfg.parallel.ep, etp=cfg.parallel.etp)
        cfg.check_world(self.rt.world_size)
        self.placement = assembly.engine_placement(cfg, self.rt.rank, self.rt.world_size)
        check_fp8_supported(cfg.precision)
        self.ft = FaultTolerance.start(log=self.say)  # heartbeats under ft_launcher; inert otherwise
        self.timed = PhaseTimer(self.ft)
        self.stop = StopRequest(t.time_budget_s)
        self.stop_reason = None
        checkpoint_files = ckpt_files.CheckpointManager(t.checkpoint_dir, t.keep_last, log=self.say)
        self.resume_from = checkpoint_files.select(t.resume)
        assembly.prepare_model_dir(cfg, self.rt.rank, self.run_dir, self.resume_from is not None, self.say)
        self.arch, self.loss = assembly.build_loss_and_arch(cfg)
        if self.resume_from is not None:  # before building anything: another model is a clear error, early
            saved = ckpt_files.read_metadata(self.resume_from)
            ckpt_files.check_compatible(saved["fingerprint"], fingerprint(cfg, self.arch, self.loss), self.resume_from)
        data = assembly.build_data(cfg)
        self.tokenizer, self.dataset, self.sampler, self.eval_set = (data.tokenizer, data.dataset, data.sampler,
                                                                     data.eval_set)
        self.rewards = build_rewards(cfg.rewards) if self.placement.is_engine_leader else None
        self.reward_labels = [term.label for term in cfg.rewards.terms]
        parts = assembly.build_models(cfg, self.arch, self.loss, self.rt, self.resume_from is not None)
        self.model, self.reference, self.schedule = parts.model, parts.reference, parts.schedule
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        params = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        self.say(f"[model] policy built: {params / 1e6:.2f}M parameters on this rank"
                 f"{', frozen reference too' if self.reference is not None else ''}; starting the rollout engine")
        self.engine = assembly.build_engine(cfg, self.placement)
        self.say(sleep_note(self.engine))
        self.async_saver = dist_ckpt.AsyncSaver() if t.async_save else None
        self.checkpointer = TrainingCheckpointer(
            checkpoint_files, self.model, self.optimizer, {"scheduler": self.scheduler, "sampler": self.sampler},
            {"fingerprint": fingerprint(cfg, self.arch, self.loss), "layout": layout(cfg, self.rt),
             "config": to_plain(cfg)}, self.rt.rank, self.async_saver, log=self.say, pg=self.rt.pg)
        self.step = 0
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self.metrics = None
        if self.rt.is_logger:
            history = self.resume_from / "metrics.jsonl" if self.resume_from is not None else None
            self.metrics = MetricsLog(self.run_dir, resume_step=self.step if history else None, history=history)
            write_resolved(cfg, self.run_dir / "config.resolved.yaml")

    def say(self, msg: str) -> None:
        if self.rt.is_logger:
            self.log_fn(msg)

    # ----- the phases -------------------------------------------------------------------------------
    def sample_prompts(self):
        """The global prompt batch (the same on every rank)."""
        return self.sampler.next_batch(self.cfg.trainer.prompts_per_step)

    def replica_share(self, num_prompts: int):
        """[start, stop) of the global batch that this rank's data-parallel replica trains on."""
        return balanced_slice(num_prompts, self.rt.dp, self.rt.dp_rank)

    def generate_and_score(self, batch, round_index: int = 0,
                           gather_all: bool = False) -> Tuple[List[RolloutGroup], RolloutStats]:
        """Every engine samples N responses for its slice of the batch, its first rank scores them; then each
        replica gets the scored groups of its share (group ids are positions in the global batch), or with
        gather_all every rank gets all of them (dynamic sampling's refill round `round_index`). Returns
        those groups and the rollout statistics summed over the world."""
        start, stop = self.placement.share(len(batch))
        records = batch[start:stop]
        local: List[RolloutGroup] = []
        stats = RolloutStats()
        with self.timed("generate"):
            result = self.engine.generate([r.prompt_ids for r in records], self.cfg.trainer.responses_per_prompt,
                                          self.cfg.rollout.sampling, seed=self._rollout_seed(),
                                          first_index=start + round_index * len(batch))
        if self.placement.is_engine_leader:
            with self.timed("score"):
                flat = result.flat()
                texts = [self.tokenizer.decode(ids) for ids in flat.response_token_ids]
                scored = self.rewards.score_records([records[p] for p in flat.prompt_index], texts,
                                                    [len(ids) for ids in flat.response_token_ids])
                local = result.to_groups(torch.tensor(scored.total, dtype=torch.float32),
                                         group_ids=[start + p for p in range(len(records))])
                stats = RolloutStats(samples=float(len(texts)), tokens=float(result.num_response_tokens),
                                     term_sums={k: float(sum(v)) for k, v in scored.terms.items()})
        with self.timed("exchange"):
            reduced = stats.reduced(self.reward_labels, self.rt.device)
            if gather_all:
                return gather_round(local, len(batch)), reduced
            return exchange_groups(local, self.replica_share(len(batch)), self.placement, self.rt.dp,
                                   device=self.rt.device), reduced

    def _rollout_seed(self) -> int:
        return self.cfg.trainer.seed * 1_000_003 + self.step * 131

    def pack(self, groups: List[RolloutGroup]):
        t = self.cfg.trainer
        rule = dict(microbatch_rule(t, self.cfg.parallel), pad_id=self.tokenizer.pad_token_id or 0)
        mbs = pack_microbatches(groups, **rule)
        if self.cfg.parallel.ep > 1 and "max_tokens" in rule:
            # every MoE layer's token dispatch is a collective over the expert-parallel ranks, which are data-parallel
            # peers: all of them must run as many microbatches as the rank with the most
            most = torch.tensor([len(mbs)], device=self.rt.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.rt.pg.dp)
            if int(most) > len(mbs):
                mbs = pack_microbatches(groups, **rule, min_count=int(most))
        if self.cfg.rollout.routing_replay:  # the engine's routes, laid out as the model's rows (algo/routes.py)
            attach_routes(mbs, groups)
        for mb in mbs:
            check_loss_inputs(mb.loss_inputs, expected_sizes=mb.group_sizes)
            mb.to(self.rt.device)
        return mbs

    def anchor(self, mbs) -> None:
        """Fills the microbatches' anchor (and, when the loss wants them, reference) log-probs in place."""
        with self.timed("anchor"):
            model = [self.reference] if self.loss.anchor == "ref" else self.model
            if self.cfg.loss.anchor_source == "rollout":
                fill_rollout_anchor(mbs)
            elif not self_anchored(self.loss, self.cfg.trainer):  # else the train pass provides them (no extra forward)
                self.schedule.fill_anchor_logprobs(model, mbs)
            if self.loss.needs_ref_logprobs:
                for mb, lp in zip(mbs, self.schedule.compute_logprobs([self.reference], mbs)):
                    mb.loss_inputs.ref_logprobs = lp * mb.loss_inputs.mask

    def train(self, mbs):
        """One optimizer update on the microbatches; returns (step result, updates redone after an fp16 overflow)."""
        with self.timed("train"):
            anchored = self_anchored(self.loss, self.cfg.trainer, self.cfg.loss.anchor_source)
            result, redone = step_until_no_overflow(
                lambda: self.schedule.train_step(mbs, self.optimizer, self_anchor=anchored),
                self.optimizer, self.cfg.optim)
            self.scheduler.step(1)
        return result, redone

    def sync_weights(self) -> None:
        """Every rank's engine gets the full trained weights (gathered over TP, broadcast over PP)."""
        with self.timed("weight_sync"):
            self.engine.update_weights(iter_policy_as_hf(self.model, self.arch, self.rt.pg))

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
                total = sum(self.rewards.score_records(records, [self.tokenizer.decode(o) for o in outs],
                                                       [len(o) for o in outs]).total)
            summed = sum_over_world([total], self.rt.device)[0]
        return {"eval/reward_mean": summed / count}

    # ----- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """All ranks: this step's checkpoint (trainer/checkpointing.py); the stop budget learns its cost."""
        metrics_path = self.metrics.path if self.metrics is not None else None
        self.stop.note_save(self.checkpointer.save(self.step, metrics_path))

    def load_checkpoint(self, path: Path) -> None:
        """All ranks: the saved state, then the engine gets the loaded weights."""
        start = time.perf_counter()
        self.step, note = self.checkpointer.load(path)
        self.sync_weights()
        self.say(f"[checkpoint] resumed from {path} at step {self.step} in {time.perf_counter() - start:.2f}s ({note})")

    def _save_due(self) -> bool:
        every, total = self.cfg.trainer.save_every, self.cfg.trainer.steps
        return every > 0 and (self.step % every == 0 or self.step == total)

    def _end_of_step(self, values: Dict[str, float]) -> None:
        """Stop decision (one all-reduce over the world), then a checkpoint if due or a stop was agreed."""
        self.stop.note_step(values["step_time_s"])
        self.stop_reason = self.stop.agree(device=self.rt.device)
        if self.stop_reason is not None or self._save_due():
            self.save_checkpoint()
            self.stop_reason = self.stop_reason or self.stop.agree(device=self.rt.device)  # a signal during the save
        if self.async_saver is not None:
            self.async_saver.poll(blocking=False)

    @property
    def requeue_requested(self) -> bool:
        """A stop was agreed before the last step: the job should be requeued (train.py exits with the code)."""
        return self.stop_reason is not None and self.step < self.cfg.trainer.steps

    # ----- the loop ---------------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        self.timed.reset()
        t0 = time.perf_counter()
        ds_metrics: Dict[str, float] = {}
        if self.cfg.trainer.dynamic_sampling.enabled:  # refill zero-variance groups (rollout/dynamic_sampling.py)
            groups, stats, ds_metrics = dynamic_rollout(self, self.cfg.trainer.dynamic_sampling,
                                                        self.cfg.trainer.prompts_per_step)
        else:
            groups, stats = self.generate_and_score(self.sample_prompts())
        updates = self.cfg.trainer.updates_per_rollout
        per_update, left = divmod(len(groups), updates)
        if left:  # the config checks make this impossible; never drop scored groups silently
            raise RuntimeError(f"{len(groups)} groups on this replica do not split into "
                               f"trainer.updates_per_rollout={updates} updates")
        set_engine_asleep(self, True)
        rewards = torch.cat([g.rewards for g in groups])
        # Anchors for every update of this rollout batch come first: with anchor `old` they are the
        # policy that generated the rollouts (before the batch's first update).
        batches = [self.pack(groups[u * per_update:(u + 1) * per_update]) for u in range(updates)]
        for mbs in batches:
            self.anchor(mbs)
        values: Dict[str, float] = {}
        for u, mbs in enumerate(batches):
            result, redone = self.train(mbs)
            values.update(result.values())  # the plain keys keep the last update's values
            values["grad_norm"] = float(result.grad_norm) if result.grad_norm is not None else float("nan")
            if updates > 1:
                values.update(per_update_metrics(u, values))
            if self.cfg.optim.fp16:  # an overflow halves the loss scale and the update is redone
                values["fp16_redone_updates"] = values.get("fp16_redone_updates", 0.0) + redone
                values["loss_scale"] = float(self.optimizer.get_loss_scale())
        set_engine_asleep(self, False)
        self.sync_weights()
        self.step += 1
        values.update(ds_metrics)
        return self._step_metrics(values, rewards, stats, time.perf_counter() - t0)

    def _step_metrics(self, values, rewards, stats: RolloutStats, wall: float) -> Dict[str, float]:
        moments = torch.stack([rewards.sum(), (rewards ** 2).sum(), torch.tensor(float(rewards.numel()))]).double()
        dist.all_reduce(moments, group=self.rt.pg.dp)
        mean = float(moments[0] / moments[2])
        values.update(reward_mean=mean, reward_std=max(0.0, float(moments[1] / moments[2]) - mean ** 2) ** 0.5,
                      lr=self.optimizer.param_groups[0]["lr"], step_time_s=wall)
        values.update({f"reward/{k}": v for k, v in stats.term_means().items()})
        values["tokens_per_s"] = stats.tokens / max(wall, 1e-9)  # all engines together
        values.update({f"time/{k}_s": v for k, v in self.timed.seconds.items()})
        return values

    def run(self) -> List[Dict[str, float]]:
        history = []
        total = self.cfg.trainer.steps
        self.say(f"[train] {total} steps, {self.cfg.trainer.prompts_per_step} prompts x "
                 f"{self.cfg.trainer.responses_per_prompt} responses, loss {self.cfg.loss.name}, world {self.rt.world_size}")
        every = self.cfg.trainer.eval_every
        self.stop.install()
        self.stop_reason = self.stop.agree(device=self.rt.device)  # a stop during start-up: no step, no save
        if self.eval_set is not None and self.step == 0 and self.stop_reason is None:
            start = self.evaluate()
            if start:
                self.say(f"[eval] step 0 greedy reward {start['eval/reward_mean']:.3f}")
                if self.metrics is not None:
                    self.metrics.log(0, start)
            self.stop_reason = self.stop.agree(device=self.rt.device)
        self._clear_requeue_file()
        run_start, clock = self.step, EtaClock(self.step)
        try:
            while self.step < total and self.stop_reason is None:
                values = self.train_step()
                if self.eval_set is not None and (self.step % every == 0 or self.step == total):
                    values.update(self.evaluate())
                history.append(values)
                if self.metrics is not None:
                    self.metrics.log(self.step, values)
                if self.step % self.cfg.trainer.log_every == 0 or self.step == total:
                    self.say(step_line(self.step, total, values, clock.eta(self.step, total)))
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
        if self.rewards is not None:
            self.rewards.close()  # math_verify's worker processes
        self.ft.close()
        self.rt.close()
