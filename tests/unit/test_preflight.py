"""Checks before any model is built: each bad input is a UserError naming its key / file, in well under a second.

Also: a stop signal that arrives during start-up (before the trainer's StopRequest exists) is not fatal: it is
recorded and the first agreement sees it; a user reward module that fails to import names its file."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from megatron_gift.config.run import load_run_config
from megatron_gift.resilience import stop as stop_mod
from megatron_gift.trainer.preflight import preflight
from megatron_gift.utils.errors import UserError
from tests.tiny_hf import save_tiny, tiny_configs

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"


@pytest.fixture
def hf_dir(tmp_path_factory):
    return save_tiny("llama2_tied", tiny_configs()["llama2_tied"], tmp_path_factory.mktemp("m") / "hf")


def _cfg(tmp_path, *overrides):
    return load_run_config(TINY, [f"trainer.run_dir={tmp_path / 'run'}", *overrides])


def test_the_default_config_passes(tmp_path):
    preflight(_cfg(tmp_path), world_size=1)


@pytest.mark.parametrize("override,message", [
    ("rollout.engine.max_model_lenn=256", "unknown key 'max_model_lenn' in rollout.engine; did you mean 'max_model_len'"),
    ("rewards.terms=[{name: math_verfy}]", "rewards.terms[0].name: unknown reward 'math_verfy'; did you mean 'math_verify'"),
    ("rewards.terms=[{name: format, kwargs: {patern: x}}]", "rewards.terms[0]: reward 'format': bad kwargs ['patern']"),
    ("parallel.tp=2", "parallel layout: world size 1 is not divisible by tp*pp*cp"),
    ("model.mcore_dir=/nonexistent/mcore", "model.mcore_dir: /nonexistent/mcore is not a directory"),
])
def test_config_problems_name_the_key(tmp_path, override, message):
    with pytest.raises(UserError) as exc:
        preflight(_cfg(tmp_path, override), world_size=1)
    assert message in str(exc.value)


def test_paths(tmp_path, hf_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        ([f"trainer.run_dir={a_file}/run"], f"trainer.run_dir: {a_file}/run cannot be a directory: {a_file} is a file"),
        ([f"trainer.save_dir={a_file}/ckpt"], f"trainer.save_dir: {a_file}/ckpt cannot be a directory"),
        ([f"model.hf_dir={tmp_path}/none"], f"model.hf_dir: {tmp_path}/none does not exist"),
        ([f"model.hf_dir={hf_dir}/config.json"], "is a file; give the model's directory"),
        ([f"model.hf_dir={tmp_path}"], f"model.hf_dir: no config.json in {tmp_path}"),
        ([f"model.hf_dir={hf_dir}", f"data.path={tmp_path}/no.jsonl"], f"data.path: {tmp_path}/no.jsonl does not exist"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError) as exc:
            preflight(load_run_config(TINY, [f"trainer.run_dir={tmp_path / 'run'}", *overrides]), world_size=1)
        assert message in str(exc.value), (overrides, str(exc.value))


@pytest.mark.parametrize("body,message", [
    ("def reward(p, r, m):\n    return [0.0] * len(r\n", "SyntaxError"),
    ("import no_such_package_xyz\n", "ModuleNotFoundError: No module named 'no_such_package_xyz'"),
    ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
])
def test_user_reward_module_that_fails_to_import_names_its_file(tmp_path, body, message):
    module = tmp_path / "my_reward.py"
    module.write_text(body)
    with pytest.raises(UserError) as exc:
        preflight(_cfg(tmp_path, f"rewards.terms=[{{name: '{module}:reward'}}]"), world_size=1)
    assert f"importing {module} failed" in str(exc.value) and message in str(exc.value)


def test_stale_conversion_of_a_dead_run_is_removed(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / "run" / f".mcore_from_hf.tmp-{proc.pid}"
    (stale / "model").mkdir(parents=True)
    preflight(_cfg(tmp_path), world_size=1)
    assert not stale.exists()


def test_a_stop_signal_during_start_up_is_recorded_not_fatal():
    previous = {s: signal.getsignal(s) for s in stop_mod.STOP_SIGNALS}
    try:
        stop_mod.install_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # e.g. while the models are being built
        request = stop_mod.StopRequest()  # the trainer's, made later
        assert request.agree() == "signal SIGUSR1"
    finally:
        stop_mod._EARLY["signal"] = None
        for s, h in previous.items():
            signal.signal(s, h)
