"""The command moves itself under tcmalloc when the machine has it (esm3_jax/allocator.py)."""

import os
import subprocess
import sys

import pytest

from esm3_jax.runtime import allocator
from tests.paths import REPO

CODE = "from esm3_jax.runtime import allocator; allocator.reexec_under_tcmalloc(); print(allocator.active())"


def _run(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ESM3_JAX_ALLOCATOR")}
    full.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=full, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(allocator.tcmalloc_library() is None, reason="no tcmalloc here (apt-get install libtcmalloc-minimal4)")
def test_reexecs_the_same_command_under_tcmalloc():
    assert _run() == "tcmalloc"


def test_switched_off_it_keeps_the_system_allocator():
    assert _run(ESM3_JAX_ALLOCATOR="system") == "system"
