"""runtime/tpu_env.py: with libtpu installed (the tpu-aot extra) and no TPU on the host, a verb's
output is its answer alone, not libtpu's start-up errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from esm3_jax.runtime import tpu_env
from tests.paths import REPO


def test_defaults_fill_only_what_is_unset(monkeypatch):
    monkeypatch.setattr(tpu_env, "host_has_tpu", lambda: False)
    env = {"TPU_WORKER_HOSTNAMES": "10.0.0.2"}
    assert tpu_env.quiet_libtpu_without_tpu(env)
    assert env == {"TPU_WORKER_HOSTNAMES": "10.0.0.2", "TPU_SKIP_MDS_QUERY": "1", "TPU_HOST_BOUNDS": "1,1,1"}
    monkeypatch.setattr(tpu_env, "host_has_tpu", lambda: True)
    on_a_tpu_host = {}
    assert not tpu_env.quiet_libtpu_without_tpu(on_a_tpu_host) and on_a_tpu_host == {}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed: nothing to silence")
def test_jax_start_up_prints_nothing_from_libtpu():
    if tpu_env.host_has_tpu():
        pytest.skip("this host has a TPU")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    code = ("from esm3_jax.runtime.tpu_env import quiet_libtpu_without_tpu; quiet_libtpu_without_tpu(); "
            "import jax; print(jax.devices()[0].platform)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu"
    assert "TPU_WORKER_HOSTNAMES" not in proc.stderr and "host bounds" not in proc.stderr, proc.stderr
