"""XLA's persistent compilation cache, on by default for the `esm3-jax` command.

A resumed, repeated or evaluated run loads its compiled programs instead of compiling them again:
the train step, the state's initialisation and its checksum here; a large model's train step
compiles for minutes on an accelerator. JAX keys every entry by the program, the compile options,
the backend and its own version, so a stale entry is never used; entries are only written for
programs that took over JAX's `jax_persistent_cache_min_compile_time_secs` (1 s) to compile.

ESM3_JAX_COMPILE_CACHE=DIR picks the folder (default $XDG_CACHE_HOME/esm3-jax/xla, else
~/.cache/esm3-jax/xla) and =off turns the cache off; JAX's own JAX_COMPILATION_CACHE_DIR, when set,
is left as it is; a folder that cannot be created or written turns the cache off (one line on
stderr says so). The folder is kept under 4 GiB, least recently used entries dropped first
(JAX_COMPILATION_CACHE_MAX_SIZE, in bytes, changes that).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_MAX_BYTES = 4 << 30
_OFF = ("off", "0", "false", "no")


def default_dir(environ=os.environ) -> Path:
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "esm3-jax" / "xla"


def enable_by_default(environ=os.environ) -> str | None:
    """Point JAX at the cache through its environment variables (read when JAX is imported, so
    this must run first: it never imports JAX, and verbs that need no JAX do not pay for it).
    Returns the folder in use, or None when the cache is off."""
    choice = environ.get("ESM3_JAX_COMPILE_CACHE", "").strip()
    if choice.lower() in _OFF:
        return None
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    folder = choice or str(default_dir(environ))
    if "://" not in folder:  # a local folder (object stores such as gs:// are JAX's to check)
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError("not writable")
        except OSError as e:
            # A read-only or full home: no cache, rather than a warning at every compile.
            print(f"esm3-jax: compilation cache off, cannot use {folder} ({e}); "
                  "ESM3_JAX_COMPILE_CACHE=DIR picks another folder", file=sys.stderr)
            return None
    environ["JAX_COMPILATION_CACHE_DIR"] = folder
    # JAX keeps the folder under a size with file locks; without filelock (a dependency of this
    # package, but an environment may lack it) it would fail every cache read instead.
    if importlib.util.find_spec("filelock") is not None:
        environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(DEFAULT_MAX_BYTES))
    return environ["JAX_COMPILATION_CACHE_DIR"]
