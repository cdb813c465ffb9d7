"""Run the `esm3-jax` command under tcmalloc when the machine has it.

XLA:CPU allocates the step's temporaries (GBs for a train step) and frees them every step.
glibc's malloc serves blocks that large with mmap and returns them with munmap, so every step
page-faults its working set back in (a third of a CPU train step was kernel time spent zeroing
pages; BENCHMARKS.md has the measurement). tcmalloc keeps freed memory for reuse. Its release rate is set to 0 (never
hand memory back: a training process wants its peak again next step) and its warnings about
allocations over 1 GiB are silenced (model parameters are routinely larger).

The allocator cannot be swapped in a running process, so the command re-executes itself (the same
command line) once with LD_PRELOAD set. ESM3_JAX_ALLOCATOR=system turns this off. Debian/Ubuntu: `apt-get install
libtcmalloc-minimal4`; without it the command runs as before, only slower on the CPU.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

_ENV_SWITCH = "ESM3_JAX_ALLOCATOR"
_TCMALLOC_SETTINGS = {
    "TCMALLOC_RELEASE_RATE": "0",
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50),
}


def tcmalloc_library() -> str | None:
    """The tcmalloc shared library the dynamic loader can find (minimal build first), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def active() -> str:
    """'tcmalloc' when this process runs under tcmalloc, else 'system'."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if "libtcmalloc" in maps.read() else "system"
    except OSError:
        return "system"


def reexec_under_tcmalloc() -> None:
    """Replace this process by the same command line under tcmalloc, when that applies.

    Returns (doing nothing) on non-Linux systems, when switched off, when tcmalloc is already
    loaded, or when no tcmalloc library is installed.
    """
    if sys.platform != "linux" or os.environ.get(_ENV_SWITCH, "tcmalloc") != "tcmalloc":
        return
    if "tcmalloc" in os.environ.get("LD_PRELOAD", "") or active() == "tcmalloc":
        return
    library = tcmalloc_library()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    for key, value in _TCMALLOC_SETTINGS.items():
        env.setdefault(key, value)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
