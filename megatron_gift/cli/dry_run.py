"""`python -m megatron_gift.cli.dry_run CONFIG --nodes N --gpus-per-node G [--gpu-mem-gib 80] [--set k=v ...]`

Validates a run config against a cluster allocation without one: the parallel layout for N x G GPUs
(launch/layout.py) and a per-GPU memory estimate of the training step next to the colocated vLLM engine
(launch/memory.py, whose docstring states every formula). The model's shape comes from model.hf_dir's
config.json (the recipes point at the config-only copies in examples/arch/). Exit status 0: the layout
is valid and the estimate fits; 1: an error or a GPU that does not fit, named on the last line.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from megatron_gift.config.moe import aux_loss_coeff
from megatron_gift.planning.memory import (ATTENTION, GIB, RECOMPUTE, StageEstimate, VllmEstimate, estimate_stage,
                                         estimate_vllm, static_bytes)
from megatron_gift.planning.model_size import total_params
from megatron_gift.cli.args import positive_int

_KNOBS = {
    "activations": "parallel.recompute: full (or selective), more trainer.microbatches (fewer groups each), parallel.cp, parallel.tp with "
                   "sequence_parallel, or shorter data.max_prompt_tokens / rollout.sampling.max_new_tokens",
    "logits + log-softmax": "more trainer.microbatches, parallel.tp or parallel.cp, or shorter sequences",
    "optimizer state": "parallel.use_distributed_optimizer, or more data-parallel ranks",
    "weights": "more parallel.tp or parallel.pp",
    "main grads (fp32)": "more parallel.tp or parallel.pp",
    "reference model": "loss.options.anchor: old (no frozen copy)",
    "vLLM share": "a lower rollout.engine.gpu_memory_utilization",
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m megatron_gift.cli.dry_run", description=__doc__.split("\n\n")[1])
    ap.add_argument("config", help="run config YAML")
    ap.add_argument("--nodes", type=positive_int, required=True)
    ap.add_argument("--gpus-per-node", type=positive_int, required=True)
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU (H100 SXM: 80)")
    ap.add_argument("--reserve-gib", type=float, default=4.0,
                    help="CUDA context, NCCL buffers and fragmentation kept free on every GPU (default 4)")
    ap.add_argument("--attention", choices=ATTENTION, default="te",
                    help="te: Transformer Engine spec with flash attention (cluster containers); local: "
                         "Megatron's local spec (no TE), which materialises the attention probabilities")
    ap.add_argument("--recompute", choices=RECOMPUTE, default=None,
                    help="activation recompute to assume instead of the config's parallel.recompute (a what-if)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return ap.parse_args(argv)


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def describe(cfg, arch, arch_path: str, rep, args) -> List[str]:
    par, t, plan = cfg.parallel, cfg.trainer, rep.plan
    vm = cfg.model.vocab_multiple
    mp = par.tp * par.pp * par.cp
    dp = rep.world_size // mp if rep.world_size % mp == 0 else "?"
    on = {True: "on", False: "off"}
    what_if = "" if args.recompute == par.recompute else f" (what-if; the config says {par.recompute})"
    lines = [f"dry run: {args.config} on {args.nodes} node(s) x {args.gpus_per_node} GPUs = {rep.world_size}, "
             f"{args.gpu_mem_gib:g} GiB per GPU",
             f"model: {arch.model_type} {total_params(arch, vm) / 1e9:.2f}B params from {arch_path}: "
             f"L={arch.num_layers} h={arch.hidden_size} heads={arch.num_heads}/{arch.num_kv_heads} "
             f"ffn={arch.ffn_hidden_size} vocab={arch.vocab_size} (padded {arch.padded_vocab_size(vm)})",
             f"layout: TP={par.tp} PP={par.pp} VPP={par.vpp or '-'} CP={par.cp} DP={dp}; sequence parallel "
             f"{on[par.sequence_parallel]}, distributed optimizer {on[par.use_distributed_optimizer]}, "
             f"{cfg.precision.dtype}, attention {args.attention}, recompute {args.recompute}{what_if}"]
    if arch.moe is not None:
        m = arch.moe
        aux = "" if cfg.model.moe_load_balancing == "none" else f" (coefficient {aux_loss_coeff(arch, cfg.model):g})"
        lines.append(f"experts: {m.num_experts} x ffn {m.ffn_hidden_size}, top-{m.top_k}, over EP={par.ep} x "
                     f"ETP={par.etp} ({m.num_experts // par.ep if m.num_experts % par.ep == 0 else '?'} per rank); "
                     f"router load balancing {cfg.model.moe_load_balancing}{aux}, router {cfg.model.moe_router_dtype}")
    if plan:
        lines.append(f"batch: {t.prompts_per_step} prompts per rollout = {t.updates_per_rollout} updates x "
                     f"{t.prompts_per_step // t.updates_per_rollout} prompts x {t.responses_per_prompt} responses; per "
                     f"DP rank and update {t.microbatches} microbatches of {plan.seqs_per_microbatch} sequences x "
                     f"{plan.seq_len} tokens (prompt {cfg.data.max_prompt_tokens} + response "
                     f"{cfg.rollout.sampling.max_new_tokens}, padded)")
    lines += [f"  warning: {w}" for w in rep.warnings]
    lines += [f"  ERROR: {e}" for e in rep.errors]
    return lines


def memory_table(stages: List[StageEstimate], vllm: VllmEstimate, args) -> List[str]:
    shown = [stages[0]] if len(stages) == 1 else [stages[0], stages[-1]]
    head = "memory per GPU (GiB)".ljust(28) + "".join(f"{'stage ' + str(s.stage):>10}" for s in shown) + "   formula"
    lines = [head]
    formulas = {}
    for s in shown:
        for i in s.items:
            formulas.setdefault(i.name, i.formula)
    for name, formula in formulas.items():
        row = "".join(f"{_gib(s.get(name)):>10}" if name in {i.name for i in s.items} else f"{'-':>10}"
                      for s in shown)
        lines.append(f"  {name:<26}{row}   {formula}")
    note = "resident during training" if vllm.asleep is None else (
        f"asleep during training (awake {_gib(vllm.share).strip()} GiB while generating)")
    lines.append(f"  {'vLLM share':<26}" + f"{_gib(vllm.during_training):>10}" * len(shown) + f"   {note}")
    lines.append(f"  {'reserve':<26}" + f"{_gib(args.reserve_gib * GIB):>10}" * len(shown)
                 + "   CUDA context, NCCL, fragmentation")
    lines.append(f"  {'total':<26}" + "".join(f"{_gib(_peak(s, vllm) + args.reserve_gib * GIB):>10}"
                                              for s in shown) + f"   of {args.gpu_mem_gib:g} GiB")
    return lines


def _peak(stage: StageEstimate, vllm: VllmEstimate) -> float:
    """The stage's peak with the engine: training + engine, or with sleep the larger of the two phases."""
    if vllm.asleep is None:
        return stage.total + vllm.share
    return max(stage.total + vllm.asleep, static_bytes(stage) + vllm.share)


def verdict(stages: List[StageEstimate], vllm: VllmEstimate, args) -> tuple[bool, str]:
    budget = args.gpu_mem_gib * GIB
    fixed = vllm.share + args.reserve_gib * GIB
    worst = max(stages, key=lambda s: _peak(s, vllm))
    need = _peak(worst, vllm) + args.reserve_gib * GIB
    if need <= budget:
        return True, (f"result: OK: the fullest GPU (stage {worst.stage}) needs {need / GIB:.1f} of "
                      f"{args.gpu_mem_gib:g} GiB")
    biggest = max(worst.items, key=lambda i: i.bytes)
    if fixed >= budget:
        biggest_name, knob = "vLLM share", _KNOBS["vLLM share"]
    else:
        biggest_name, knob = biggest.name, _KNOBS.get(biggest.name, "")
    size = vllm.share if biggest_name == "vLLM share" else biggest.bytes
    return False, (f"result: DOES NOT FIT: stage {worst.stage} needs {need / GIB:.1f} GiB > {args.gpu_mem_gib:g} GiB "
                   f"(over by {(need - budget) / GIB:.1f} GiB); largest item: {biggest_name} {size / GIB:.1f} GiB "
                   f"-> {knob}")


def run(args: argparse.Namespace, out=print) -> int:
    with warnings.catch_warnings():  # megatron-core's "TE / apex not installed" import notes are noise here
        warnings.simplefilter("ignore")
        from megatron_gift.hf.arch import load_hf_arch
        from megatron_gift.planning.layout import check_layout
        from megatron_gift.config.run import load_run_config
    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        out(f"result: CONFIG ERROR in {args.config}: {exc}")
        return 1
    if not cfg.model.hf_dir:
        out("result: CONFIG ERROR: model.hf_dir is empty; the dry run reads the model shape from its config.json "
            "(--set model.hf_dir=DIR)")
        return 1
    arch_path = str(Path(cfg.model.hf_dir) / "config.json")
    try:
        arch = load_hf_arch(Path(arch_path))
    except (ValueError, FileNotFoundError) as exc:
        out(f"result: CONFIG ERROR (model.hf_dir): {exc}")
        return 1
    if args.recompute is None:
        args.recompute = cfg.parallel.recompute
    rep = check_layout(cfg, arch, arch_path, args.nodes, args.gpus_per_node, args.attention, args.recompute)
    for line in describe(cfg, arch, arch_path, rep, args):
        out(line)
    if not rep.ok:
        out(f"result: INVALID LAYOUT ({len(rep.errors)} error(s) above)")
        return 1
    plan = rep.plan
    stages = [estimate_stage(plan, s) for s in range(plan.pp)]
    vllm = estimate_vllm(arch, cfg.model.vocab_multiple, rep.vllm, args.gpu_mem_gib * GIB)
    for line in memory_table(stages, vllm, args):
        out(line)
    out(f"vLLM engine: TP={rep.vllm.tensor_parallel_size}, weights {vllm.weights / GIB:.1f} GiB + KV cache "
        f"{vllm.kv_cache / GIB:.1f} GiB per GPU = {vllm.kv_cache / vllm.kv_bytes_per_token:,.0f} tokens = "
        f"{vllm.full_sequences:.1f} sequences of max_model_len {rep.vllm.max_model_len}")
    ok = True
    if vllm.full_sequences < 1:
        out("  ERROR: rollout.engine: the KV cache cannot hold one max_model_len sequence: raise "
            "rollout.engine.gpu_memory_utilization or rollout.engine.tensor_parallel_size")
        ok = False
    elif vllm.full_sequences < cfg.trainer.responses_per_prompt:
        out(f"  warning: the KV cache holds fewer full-length sequences than one group "
            f"({cfg.trainer.responses_per_prompt}): long rollouts will be preempted and recomputed")
    fits, line = verdict(stages, vllm, args)
    out(line)
    return 0 if ok and fits else 1


def main(argv: Optional[List[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
