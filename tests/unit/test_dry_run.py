"""Dry run: the 8B / 70B recipes against their world sizes, memory items against hand calculations, the
activation formula against saved-tensor bytes of a real Megatron layer on CPU, and layout errors naming keys.

Hand numbers come from the public Llama-3.1 shapes (8B: h 4096, 32 layers, 32/8 heads of 128, ffn 14336;
70B: h 8192, 80 layers, 64/8 heads, ffn 28672; vocab 128256) written out here, not from the code under test.
"""
from pathlib import Path

import pytest
import torch

from megatron_gift.hf.arch import load_hf_arch, parse_hf_config
from megatron_gift.cli.dry_run import parse_args, run
from megatron_gift.planning.layout import check_layout
from megatron_gift.planning.memory import GIB, TrainPlan, activation_bytes, estimate_stage, in_flight
from megatron_gift.planning.model_size import total_params
from megatron_gift.config.run import load_run_config

ROOT = Path(__file__).resolve().parents[2]
R8B, R70B = ROOT / "examples/llama3_8b_gift.yaml", ROOT / "examples/llama3_70b_gift.yaml"
V = 128256


def _layout(recipe, nodes, gpus=8, overrides=(), **kw):
    cfg = load_run_config(recipe, list(overrides))
    arch_path = str(Path(cfg.model.hf_dir) / "config.json")
    return cfg, check_layout(cfg, load_hf_arch(Path(arch_path)), arch_path, nodes, gpus, **kw)


def _dry(*argv):
    lines = []
    code = run(parse_args([str(a) for a in argv]), out=lines.append)
    return code, "\n".join(lines)


# ----- recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [R8B, R70B])
def test_recipes_load_and_mirror_the_released_gift_settings(recipe):
    cfg = load_run_config(recipe)
    t = cfg.trainer
    assert (t.responses_per_prompt, t.prompts_per_step, t.updates_per_rollout) == (16, 1024, 4)
    assert (cfg.data.max_prompt_tokens, cfg.rollout.sampling.max_new_tokens) == (2048, 4096)
    assert (cfg.optim.lr, cfg.optim.clip_grad, cfg.loss.name) == (3e-6, 1.0, "gift")
    assert cfg.loss.options == {"beta": 1.0, "grad_mode": "detached", "anchor": "old"}
    assert cfg.precision.dtype == "bfloat16" and cfg.parallel.use_distributed_optimizer
    assert (Path(cfg.model.hf_dir) / "config.json").is_file()


def test_public_parameter_counts():
    assert total_params(load_hf_arch(ROOT / "examples/arch/llama3_8b"), 128) == 8_030_261_248
    assert total_params(load_hf_arch(ROOT / "examples/arch/llama3_70b"), 128) == 70_553_706_496


@pytest.mark.parametrize("recipe,nodes", [(R8B, 1), (R70B, 8)])
def test_recipes_pass_with_full_recompute_and_name_activations_without(recipe, nodes):
    code, text = _dry(recipe, "--nodes", nodes, "--gpus-per-node", 8)  # the recipes say parallel.recompute: full
    assert code == 0 and "result: OK" in text and "ERROR" not in text and "recompute full\n" in text, text
    code, text = _dry(recipe, "--nodes", nodes, "--gpus-per-node", 8, "--recompute", "none")
    assert code == 1 and "DOES NOT FIT" in text and "largest item: activations" in text, text
    assert "recompute none (what-if; the config says full)" in text
    code, text = _dry(recipe, "--nodes", nodes, "--gpus-per-node", 8, "--set", "parallel.recompute=selective")
    assert "attention core recomputed (selective)" in text, text


# ----- memory items against hand calculations ----------------------------------------------------------
def test_8b_tp8_items_by_hand():
    _, rep = _layout(R8B, 1)
    layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 4096 * 2 * 14336 + 14336 * 4096  # 218,103,808
    params = 32 * (layer // 8 + 2 * 4096) + 2 * (V // 8) * 4096 + 4096  # embedding + output shards, final norm
    stage = estimate_stage(rep.plan, 0)
    assert stage.get("weights") == 2 * params == 2_008_031_232  # ~2.0 GB of bf16 weights per GPU at TP8
    assert stage.get("main grads (fp32)") == 4 * params
    assert stage.get("optimizer state") == 12 * params  # DP = 1: the distributed optimizer has nothing to shard
    # TE spec with sequence parallelism: 2 B x (4h/8 + (2q + 2k + 5f)/8) per token and layer
    per_token = 2 * (4 * 4096 / 8 + (2 * 4096 + 2 * 1024 + 5 * 14336) / 8)
    assert per_token == 24576
    assert stage.get("activations") == 32 * 16 * 6144 * per_token == 72 * GIB
    assert stage.get("logits + log-softmax") == 16 * 6144 * (V // 8) * 10
    assert "reference model" not in [i.name for i in stage.items]  # anchor old: no frozen copy


def test_70b_distributed_optimizer_and_reference_copy():
    _, rep = _layout(R70B, 8)
    plan = rep.plan
    assert (plan.tp, plan.pp, plan.dp, plan.cp) == (8, 4, 2, 1)
    layer = 8192 * (8192 + 2 * 1024) + 8192 * 8192 + 8192 * 2 * 28672 + 28672 * 8192
    first = 20 * (layer // 8 + 2 * 8192) + (V // 8) * 8192
    s0 = estimate_stage(plan, 0)
    assert s0.get("weights") == 2 * first
    assert s0.get("optimizer state") == 12 * first / 2
    _, rep_ref = _layout(R70B, 8, overrides=["loss.options.anchor=ref", "parallel.use_distributed_optimizer=false"])
    s0 = estimate_stage(rep_ref.plan, 0)
    assert s0.get("reference model") == 2 * first and s0.get("optimizer state") == 12 * first


def test_pipeline_in_flight_counts():
    _, rep = _layout(R70B, 8)
    plan = rep.plan  # pp 4, 128 microbatches, 1F1B: stage i holds pp - i microbatches of 20 layers
    assert [in_flight(plan, s) for s in range(4)] == [(4, 20), (3, 20), (2, 20), (1, 20)]
    few = TrainPlan(**{**plan.__dict__, "microbatches": 2})
    assert in_flight(few, 0) == (2, 20)
    inter = TrainPlan(**{**plan.__dict__, "vpp": 2, "microbatches": 8})
    units, per = in_flight(inter, 0)
    # Korthikanti et al.: the first stage of an interleaved schedule holds L * (1 + (p-1)/(p*v)) layers' worth
    assert units * per == 80 * (1 + 3 / 8)


def test_full_recompute_keeps_layer_inputs_plus_one_layer():
    _, rep = _layout(R70B, 8, recompute="full")
    act, _ = activation_bytes(rep.plan, 0)
    tokens = 16 * 6144
    inputs = 4 * 20 * tokens * 2 * 8192 / 8  # 4 microbatches x 20 layers x bf16 h / TP (sequence parallel)
    one_layer = tokens * 2 * (4 * 8192 / 8 + (2 * 8192 + 2 * 1024 + 5 * 28672) / 8)
    assert act == inputs + one_layer


# ----- the activation formula against what autograd really saves (local spec, CPU) -------------------------
_TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": False, "hidden_act": "silu"}


def _one_layer_saved_bytes(rank, world, b, s):
    """Saved-activation bytes of a 2-layer minus a 1-layer model: one decoder layer (head and logits cancel)."""
    return _saved_bytes(2, b, s) - _saved_bytes(1, b, s)


def _saved_bytes(layers, b, s):
    """Bytes of distinct storages autograd saves in one forward (parameters excluded)."""
    from megatron_gift.mcore.model import build_gpt_model
    model = build_gpt_model(parse_hf_config({**_TINY, "num_hidden_layers": layers}), dtype=torch.float32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    ids = torch.randint(0, 256, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, torch.arange(s).expand(b, s), None)
    return sum(seen.values())


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_local_spec_activation_formula_matches_saved_tensors(tp):
    from megatron_gift.mcore.testing.harness import run_distributed
    b, s = 8, 64
    measured = run_distributed(_one_layer_saved_bytes, tp, tp=tp, b=b, s=s)[0]
    arch = parse_hf_config({**_TINY, "num_hidden_layers": 1})
    plan = TrainPlan(arch=arch, tp=tp, pp=1, cp=1, dp=1, vpp=None, sequence_parallel=False,
                     distributed_optimizer=False, dtype_bytes=4, microbatches=1, seqs_per_microbatch=b, seq_len=s,
                     vocab_multiple=128, reference_copy=False, attention="local")
    predicted, _ = activation_bytes(plan, 0)
    # what the formula leaves out is O(s), not O(b*s): RoPE cos/sin tables, the causal mask, RMSNorm's rstd
    assert abs(measured - predicted) / measured < 0.02, (measured, predicted)


# ----- layout errors name the key -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,nodes,pattern", [
    (["parallel.tp=16"], 16, r"parallel.tp=16: num_key_value_heads=8 in .*llama3_70b/config.json"),
    (["parallel.pp=3", "parallel.tp=8"], 3, r"parallel.pp=3: num_hidden_layers=80"),
    ([], 3, r"parallel.tp / parallel.pp / parallel.cp: world size 24 is not divisible by tp\*pp\*cp"),
    (["trainer.microbatches=3"], 8, r"trainer.microbatches: .*cannot be split into whole groups"),
    (["parallel.vpp=2", "trainer.microbatches=2"], 8, r"trainer.microbatches=2: the interleaved schedule"),
    (["parallel.vpp=3"], 8, r"parallel.pp x parallel.vpp=12: num_hidden_layers=80"),
    (["model.vocab_multiple=100"], 8, r"model.vocab_multiple=100: the padded vocabulary 128300"),
    (["rollout.engine.max_model_len=4096"], 8, r"rollout.engine.max_model_len=4096 < .* = 6144"),
    (["parallel.cp=2"], 8, r"parallel.sequence_parallel with parallel.tp=8 x parallel.cp=2"),
    (["parallel.cp=8", "parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=1"], 8,
     r"parallel.cp=8: context parallelism splits each sequence into 2\*cp=16 chunks"),
    (["model.mcore_dir="], 8, r"model.mcore_dir is empty: TP=8 x PP=4"),
    (["rollout.engine.tensor_parallel_size=16"], 8, r"rollout.engine.tensor_parallel_size=16 must divide the 8 GPUs per node"),
])
def test_impossible_layouts_name_the_key(overrides, nodes, pattern):
    _, rep = _layout(R70B, nodes, overrides=overrides)
    assert not rep.ok and rep.plan is None
    assert any(__import__("re").search(pattern, e) for e in rep.errors), rep.errors


def test_local_attention_refuses_context_parallel_and_cli_reports_errors():
    _, rep = _layout(R70B, 8, overrides=["parallel.cp=2", "parallel.sequence_parallel=false"], attention="local")
    assert any("needs Transformer Engine attention" in e for e in rep.errors)
    code, text = _dry(R70B, "--nodes", 8, "--gpus-per-node", 8, "--set", "parallel.pp=3")
    assert code == 1 and "ERROR: parallel.pp=3" in text and "INVALID LAYOUT" in text
    code, text = _dry(R70B, "--nodes", 8, "--gpus-per-node", 8, "--set", "parallel.sequence_parallel=true",
                      "--set", "parallel.tp=1")
    assert code == 1 and "CONFIG ERROR" in text and "parallel.sequence_parallel needs parallel.tp > 1" in text


def test_vllm_share_and_kv_cache():
    code, text = _dry(R70B, "--nodes", 8, "--gpus-per-node", 8, "--recompute", "full",
                      "--set", "rollout.engine.gpu_memory_utilization=0.2")
    # 0.2 x 80 GiB = 16 GiB < 70.55B x 2 B / 8 = 16.4 GiB of weights alone: no room for one sequence
    assert code == 1 and "cannot hold one max_model_len sequence" in text, text


def test_a_sleeping_engine_is_not_counted_resident_during_training():
    """Sleep on (the GPU default): the vLLM row holds the asleep overhead and the peak is the larger phase;
    sleep off: the whole share is resident during training, as before."""
    import re
    args = [R70B, "--nodes", 8, "--gpus-per-node", 8, "--set", "parallel.recompute=full"]
    code_on, on = _dry(*args)
    code_off, off = _dry(*args, "--set", "rollout.engine.enable_sleep_mode=false")
    assert code_on == code_off == 0
    share = lambda text: [float(x) for x in re.search(r"vLLM share\s+([\d.]+)\s+([\d.]+)", text).groups()]
    total = lambda text: [float(x) for x in re.search(r"  total\s+([\d.]+)\s+([\d.]+)", text).groups()]
    assert share(on) == [2.0, 2.0] and "asleep during training (awake 24.00 GiB" in on
    assert share(off) == [24.0, 24.0] and "resident during training" in off
    row = lambda text, name: [float(x) for x in re.search(name + r"\s+([\d.]+)\s+([\S]+)", text).groups()
                              if x != "-"] + [0.0]
    for i in range(2):  # peak = max(training + asleep engine, weights/grads/optimizer + awake engine) + reserve
        static = sum(row(on, name)[i] for name in ("weights", r"main grads \(fp32\)", "optimizer state"))
        training = total(off)[i] - 24.0
        assert total(on)[i] == pytest.approx(max(training + 2.0, static + 24.0 + 4.0), abs=0.03)
        assert total(on)[i] < total(off)[i] - 19.0
