"""Fixtures shared by the test modules."""

import jax
import pytest

from tests.paths import JAX_CACHE


@pytest.fixture(scope="module")
def jax_cache():
    """XLA's persistent compilation cache for this module's runs, in- and out-of-process. It is
    keyed by program and jax version, so it is safe to keep between sessions: reruns skip compiles."""
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield JAX_CACHE
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
