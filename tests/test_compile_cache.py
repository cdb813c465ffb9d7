"""The `esm3-jax` command turns on XLA's persistent compilation cache (runtime/compile_cache.py)."""

import os
import subprocess
import sys

from esm3_jax.runtime import compile_cache
from tests.paths import REPO


def test_default_folder_and_overrides(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert compile_cache.enable_by_default(env) == str(tmp_path / "esm3-jax" / "xla")
    assert env["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(4 << 30)
    env = {"ESM3_JAX_COMPILE_CACHE": str(tmp_path / "mine")}
    assert compile_cache.enable_by_default(env) == env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "mine")
    env = {"JAX_COMPILATION_CACHE_DIR": "/theirs", "ESM3_JAX_COMPILE_CACHE": str(tmp_path)}
    assert compile_cache.enable_by_default(env) == "/theirs"  # JAX's own setting wins
    env = {"ESM3_JAX_COMPILE_CACHE": "off"}
    assert compile_cache.enable_by_default(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env


def test_a_folder_that_cannot_be_made_turns_the_cache_off(tmp_path, capsys):
    """Not a warning at every compile: the cache is off, said once, and the command goes on."""
    (tmp_path / "a_file").write_text("")
    env = {"XDG_CACHE_HOME": str(tmp_path / "a_file")}
    assert compile_cache.enable_by_default(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env
    assert f"compilation cache off, cannot use {tmp_path / 'a_file' / 'esm3-jax' / 'xla'}" in capsys.readouterr().err


def test_the_command_compiles_into_the_cache_and_reads_it_back(tmp_path):
    """Run as a program (through the re-exec under tcmalloc), a command writes what it compiles
    for over 1 s into the folder, and the same command again finds all of it there."""
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION") and k != "XLA_FLAGS"}
    env.update(ESM3_JAX_COMPILE_CACHE=str(cache), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "esm3_jax.cli", "bench", "train-step", "--config", "tiny", "--batch", "2",
               "--length", "64", "--steps", "1"]
    entries = []
    for _ in range(2):
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert entries[0] and entries[1] == entries[0]  # the train step at least; nothing compiled anew
