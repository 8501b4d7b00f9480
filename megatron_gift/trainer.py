"""The GIFT training loop: one method per phase of a step, timed.

Owns the order of a step (DESIGN.md "One training step"): sample prompts -> generate N responses per
prompt (replica leader's rollout engine) -> score -> pack whole groups -> anchor log-probs -> GIFT (or
GRPO) forward-backward and optimizer step -> push weights to the engine -> log. Each data-parallel
replica samples the same global prompt batch from the same sampler state and keeps its own share, so
the sampler position is identical on every rank.

Long runs: a checkpoint every `trainer.save_every` steps, at the end and when a stop is requested (signal
or wall-clock budget, agreed by all ranks after each step, resilience.py); `trainer.resume` picks what to
start from (checkpoint/manager.py). A checkpoint holds what makes the continuation bitwise identical on
CPU: weights, optimizer, LR schedule, sampler position, step, every rank's RNG states and the metrics
history. Rollout seeds are a function of (seed, step, prompt id), so the engine needs only the weights,
pushed to it right after loading.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_gift.algo import build_loss, check_loss_inputs
from megatron_gift.algo.packing import RolloutGroup, pack_microbatches, shard_groups
from megatron_gift.checkpoint import manager as ckpt_files
from megatron_gift.checkpoint.hf_arch import load_hf_arch
from megatron_gift.config import to_plain, write_resolved
from megatron_gift.data import PromptSampler, build_prompt_dataset, load_tokenizer
from megatron_gift.fault_tolerance import FaultTolerance
from megatron_gift.mcore import dist_ckpt
from megatron_gift.mcore import runtime as rt_mod
from megatron_gift.mcore.model import recompute_kwargs
from megatron_gift.mcore.precision import check_fp8_supported, transformer_precision_kwargs
from megatron_gift.mcore.schedule import GiftSchedule, ScheduleSettings
from megatron_gift.mcore.training import build_optimizer, wrap_for_training
from megatron_gift.mcore.weight_sync import iter_policy_as_hf, unwrap as unwrap_model
from megatron_gift.metrics_log import MetricsLog
from megatron_gift.resilience import REQUEUE_FILE, StopRequest
from megatron_gift.rewards import build_rewards
from megatron_gift.run_config import RunConfig


# Steps after (re)start at which ft_launcher's heartbeat timeouts are recomputed from observed intervals.
FT_TIMEOUT_STEPS = 3


def check_colocated_layout(cfg: RunConfig) -> None:
    """Refuse model-parallel replicas with the in-process vLLM engine (a deadlock otherwise).

    The engine runs on each replica's first rank only, and in-process vLLM joins the trainer's default
    process group (its external-launcher path), whose group creation is collective over every rank: the
    other ranks of a TP / PP / CP > 1 replica never join, and start-up hangs (seen at TP=2 on gloo).
    Data parallelism works: every rank leads its own replica and starts its engine at the same time.
    """
    model_parallel = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    if model_parallel > 1:
        raise NotImplementedError(
            f"parallel.tp * pp * cp = {model_parallel}: training with model-parallel replicas needs the rollout "
            "engine out of the trainer's process group (vLLM in its own processes), which is not implemented "
            "yet; run with tp = pp = cp = 1 (data parallel only)")


class Trainer:
    """Build everything from a RunConfig on this rank, then `run()` the configured number of steps."""

    def __init__(self, cfg: RunConfig, log=print):
        self.cfg, self.log_fn = cfg, log
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        self.rt = rt_mod.start(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.vpp, seed=t.seed)
        cfg.check_world(self.rt.world_size)
        check_colocated_layout(cfg)
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
        self.rewards = build_rewards(cfg.rewards) if self.rt.is_leader else None
        self.eval_set = None
        if cfg.eval_data is not None and t.eval_every > 0:
            self.eval_set = build_prompt_dataset(cfg.eval_data, self.tokenizer)
        self._build_models()
        self.engine = self._build_engine() if self.rt.is_leader else None
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
        """Warm-start the tiny demo model (rank 0 makes it, the others wait) when no hf_dir is given."""
        cfg = self.cfg
        if cfg.model.hf_dir:
            return
        from megatron_gift.warmstart import point_at_demo_inputs, prepare_demo_inputs
        if self.rt.rank == 0:
            prepare_demo_inputs(cfg, str(self.run_dir), log=self.say)
        dist.barrier()
        if self.rt.rank != 0:
            point_at_demo_inputs(cfg, str(self.run_dir))

    def _build_models(self) -> None:
        cfg = self.cfg
        kwargs = dict(arch=self.arch, hf_dir=cfg.model.hf_dir, mcore_dir=cfg.model.mcore_dir,
                      dtype=cfg.precision.torch_dtype, vocab_multiple=cfg.model.vocab_multiple, device=self.rt.device)
        extra = {k: v for k, v in transformer_precision_kwargs(cfg.precision).items() if k.startswith("fp8")}
        if cfg.parallel.sequence_parallel:
            extra["sequence_parallel"] = True
        extra.update(recompute_kwargs(cfg.parallel.recompute))
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
        from megatron_gift.rollout.vllm_config import VllmConfig
        from megatron_gift.rollout.vllm_engine import VllmEngine
        engine_cfg = dict(self.cfg.rollout.engine)
        engine_cfg.setdefault("seed", self.cfg.trainer.seed)
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

    # ----- checkpoints ------------------------------------------------------------------------------
    def fingerprint(self) -> Dict[str, object]:
        """Config items a checkpoint must agree with to be resumed by this run (the layout may differ)."""
        a, cfg = self.arch, self.cfg
        model = {k: getattr(a, k) for k in ("model_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_heads",
                                            "num_kv_heads", "head_dim", "vocab_size", "tie_embeddings", "qkv_bias",
                                            "qk_norm")}
        model["padded_vocab_size"] = a.padded_vocab_size(cfg.model.vocab_multiple)
        return {"model": model, "precision": {"dtype": cfg.precision.dtype},
                "loss": {"name": cfg.loss.name, "anchor": getattr(self.loss, "anchor", None)},
                "optim": {"use_distributed_optimizer": cfg.parallel.use_distributed_optimizer}}

    def _layout(self) -> Dict[str, object]:
        p = self.cfg.parallel
        return {"world_size": self.rt.world_size, "tp": p.tp, "pp": p.pp, "cp": p.cp, "vpp": p.vpp, "dp": self.rt.dp}

    def save_checkpoint(self) -> None:
        """All ranks: write this step's checkpoint into a tmp dir; committed (marker + rename) when complete."""
        start, step = time.perf_counter(), self.step
        if self.async_saver is not None:
            self.async_saver.poll(blocking=True)  # one save in flight at a time
        tmp = self.checkpoints.begin(step)
        rng_dir = tmp / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(dist_ckpt.capture_rng_state(), rng_dir / f"rank_{self.rt.rank:05d}.pt")
        if self.rt.rank == 0:
            (tmp / "model").mkdir()
            meta = {"format_version": ckpt_files.FORMAT_VERSION, "step": step, "fingerprint": self.fingerprint(),
                    "layout": self._layout(), "optimizer_sharding": dist_ckpt.OPTIM_SHARDING,
                    "config": to_plain(self.cfg)}
            (tmp / ckpt_files.METADATA).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            if self.metrics is not None and self.metrics.path.exists():
                shutil.copyfile(self.metrics.path, tmp / "metrics.jsonl")
        dist.barrier()
        plain = {"gift": {"step": step, "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict()}}
        request = dist_ckpt.save_training_state(self.model, self.optimizer, plain, tmp / "model",
                                                async_save=self.async_saver is not None)
        if request is None:
            self.checkpoints.commit(tmp, step)
        else:
            self.async_saver.submit(request, lambda: self.checkpoints.commit(tmp, step), what=str(tmp))
        seconds = time.perf_counter() - start
        self.stop.note_save(seconds)
        self.say(f"[checkpoint] step {step} " + (f"saved in {seconds:.2f}s" if request is None
                                                  else f"handed to the async writer in {seconds:.2f}s"))

    def load_checkpoint(self, path: Path) -> None:
        """All ranks: weights, optimizer, schedule, sampler, step (any layout); RNG states when the layout is
        the one saved; then the engine gets the loaded weights."""
        start = time.perf_counter()
        plain = dist_ckpt.load_training_state(self.model, self.optimizer, path / "model")["gift"]
        self.scheduler.load_state_dict(plain["scheduler"])
        self.sampler.load_state_dict(plain["sampler"])
        self.step = int(plain["step"])
        self.sync_weights()
        saved_layout = ckpt_files.read_metadata(path)["layout"]
        if saved_layout == self._layout():
            dist_ckpt.restore_rng_state(torch.load(path / "rng" / f"rank_{self.rt.rank:05d}.pt", weights_only=False))
            note = "RNG states restored"
        else:
            note = f"layout changed from {saved_layout}: RNG states stay seeded from trainer.seed"
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
        if self.async_saver is not None:
            self.async_saver.poll(blocking=False)

    @property
    def requeue_requested(self) -> bool:
        """A stop was agreed before the last step: the job should be requeued (train.py exits with the code)."""
        return self.stop_reason is not None and self.step < self.cfg.trainer.steps

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
        self.say(f"[train] step {self.step}/{total} reward {values['reward_mean']:.3f}{ev} "
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
        if self.engine is not None:
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
