"""How fast this hardware is: the datasheet peak of accelerators, the measured matmul rate of
any device (a CPU has no datasheet figure), and the timing helper the benches share.

Measured figures belong in BENCHMARKS.md with the command that produced them, not here.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.runtime import cpu_matmul

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against `device.device_kind`
# by prefix. A v4/v5p device is one chip (megacore). CPUs have no entry: MFU is then not shown.
PEAK_BF16_FLOPS = (  # first match wins: "TPU v5 lite" (v5e) before "TPU v5" (v5p)
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v4", 275e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA B200", 2250e12),
)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """The config's value when set, else the table's for this device kind, else None."""
    if override > 0:
        return override
    for prefix, flops in PEAK_BF16_FLOPS:
        if device_kind.startswith(prefix):
            return flops
    return None


def time_fn(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_rates(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """An n^3 matmul's sustained rate (FLOP/s) through XLA, per matmul library on the CPU
    (`esm3_jax.runtime.cpu_matmul`: Eigen and YNNPACK run at different rates), else one entry "xla"."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    platform = jax.default_backend()
    libraries = cpu_matmul.LIBRARIES if platform == "cpu" else ("xla",)
    rates = {}
    for lib in libraries:
        options = cpu_matmul.compiler_options(platform, lib) if platform == "cpu" else None
        f = jax.jit(lambda a, b: a @ b, compiler_options=options)
        rates[lib] = 2 * n**3 / time_fn(lambda: f(a, b).block_until_ready(), repeats, warmup=2)
    return rates


def matmul_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """The machine's matmul peak (FLOP/s) through XLA: the fastest library's rate."""
    return max(matmul_rates(dtype, n, repeats).values())


@functools.lru_cache(maxsize=None)
def matmul_peak_flops_once(dtype: str = "float32", n: int = 1024, repeats: int = 3) -> float:
    """`matmul_peak_flops`, measured once per process (per arguments) and remembered: the MFU
    denominator of a training run on a CPU, which a process calling train() again and again (tests,
    the scaling ladder) need not pay for each time. Benchmarks measure afresh, between their rounds."""
    return matmul_peak_flops(dtype, n, repeats)
