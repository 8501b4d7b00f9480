"""The package works installed from a wheel, away from the source tree.

Builds a wheel of this checkout (offline: the running interpreter's setuptools, no build isolation), installs it
with --no-deps into a fresh virtualenv outside the checkout whose dependencies come from the running
interpreter's site-packages (a plain path .pth: no editable-install finder is run), and from a temporary working
directory runs: every console script's --help, the demo's first steps (warm start + 2 RL steps with vLLM
in-process, --plot), `megatron-gift-plot` on that run, and `megatron-gift-convert-hf-to-mcore` of a tiny HF
model whose checkpoint is then loaded at TP=2 on two gloo ranks and checked against transformers' logits.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["train", "dry-run", "convert-hf-to-mcore", "convert-mcore-to-hf", "evaluate", "plot"]
TINY = ["warmstart.steps=40", "warmstart.hidden_size=128", "warmstart.intermediate_size=176",
        "warmstart.num_layers=2", "warmstart.task_n_train=64", "warmstart.task_n_eval=8",
        "trainer.steps=2", "trainer.prompts_per_step=4", "trainer.responses_per_prompt=4", "trainer.microbatches=2",
        "trainer.eval_every=0", "rollout.sampling.max_new_tokens=12", "trainer.run_dir=run"]

# Run on two gloo ranks inside the wheel's venv: load the converted checkpoint at TP=2, compare logits.
TP2_CHECK = r'''
import sys
from pathlib import Path
import torch, torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron_gift.hf.arch import load_hf_arch
from megatron_gift.mcore.convert import load_mcore_checkpoint
from megatron_gift.mcore.model import build_gpt_model
from megatron_gift.mcore.testing.harness import run_distributed

def logits(rank, world_size, mcore_dir, ids):
    arch = load_hf_arch(Path(mcore_dir))
    model = build_gpt_model(arch, dtype=torch.float32, perform_initialization=False).eval()
    load_mcore_checkpoint(model, Path(mcore_dir))
    with torch.no_grad():
        out = model(ids, torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1), None).contiguous()
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :arch.vocab_size]

if __name__ == "__main__":
    ref = torch.load(sys.argv[2])
    got = run_distributed(logits, world_size=2, tp=2, timeout=240, mcore_dir=sys.argv[1], ids=ref["ids"])
    print("max_abs_diff", max(float((g - ref["logits"]).abs().max()) for g in got))
'''


def _dependency_site_packages() -> list[str]:
    """The running interpreter's site-packages (where the dependencies are), never the checkout."""
    paths = site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
    return sorted({p for p in paths if os.path.isdir(p) and not Path(p).resolve().is_relative_to(ROOT)})


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv bin dir, env without PYTHONPATH, a working directory outside the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to setup.py
    shutil.copytree(ROOT / "megatron_gift", src / "megatron_gift", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(base / "dist"), str(src)], base, env)
    wheel = next((base / "dist").glob("megatron_gift-*.whl"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, env)
    purelib = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        base, env).strip())
    (purelib / "_megatron_gift_test_deps.pth").write_text("\n".join(_dependency_site_packages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
          "-q", str(wheel)], base, env)
    work = base / "work"
    work.mkdir()
    return venv / "bin", env, work


def test_installed_package_is_the_wheel_and_ships_its_data(wheel_venv):
    bin_dir, env, work = wheel_venv
    out = _run([str(bin_dir / "python"), "-c", "import megatron_gift, megatron_gift.data.builtin as b; "
                "print(megatron_gift.__file__); print(b.builtin_arithmetic_paths()['tokenizer'])"], work, env)
    pkg, tokenizer = out.split()
    venv = bin_dir.parent.resolve()
    assert Path(pkg).resolve().is_relative_to(venv), pkg
    assert not Path(pkg).resolve().is_relative_to(ROOT), pkg
    assert (Path(tokenizer) / "tokenizer.json").is_file()


def test_console_scripts_help(wheel_venv):
    bin_dir, env, work = wheel_venv
    for name in SCRIPTS:
        out = _run([str(bin_dir / f"megatron-gift-{name}"), "--help"], work, env, timeout=300)
        assert "usage:" in out, name


def test_demo_first_steps_and_plot(wheel_venv):
    bin_dir, env, work = wheel_venv
    shutil.copy(ROOT / "examples" / "tiny_cpu.yaml", work / "tiny_cpu.yaml")
    cmd = [str(bin_dir / "megatron-gift-train"), "tiny_cpu.yaml", "--plot"]
    for item in TINY:
        cmd += ["--set", item]
    out = _run(cmd, work, env, timeout=900)
    assert "curves written to" in out
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] is not None for r in rows)
    assert (work / "run" / "curves.png").stat().st_size > 0
    _run([str(bin_dir / "megatron-gift-plot"), "run", "--out", "again.png"], work, env)
    assert (work / "again.png").stat().st_size > 0


def test_convert_then_load_at_tp2(wheel_venv):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    bin_dir, env, work = wheel_venv
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=200, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(work / "hf")
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, work / "ref.pt")
    _run([str(bin_dir / "megatron-gift-convert-hf-to-mcore"), "--hf-dir", "hf", "--out", "mcore", "--dtype", "float32",
          "--quiet"], work, env)
    (work / "tp2_check.py").write_text(TP2_CHECK)
    out = _run([str(bin_dir / "python"), "tp2_check.py", "mcore", "ref.pt"], work, env)
    diff = float(out.split("max_abs_diff")[-1])
    print(f"TP=2 load of the wheel-converted checkpoint: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < 1e-4
