"""libtpu on a machine without a TPU: keep its start-up errors off the user's terminal.

With the `tpu-aot` extra installed (libtpu, for `esm3-jax aot`), JAX loads libtpu in every
process. On a host with no TPU, libtpu asks the cloud metadata server for the slice's accelerator
type and worker hostnames, gets nothing, and prints a screenful of errors (TPU_WORKER_HOSTNAMES,
"Failed to find host bounds") before the command's answer. Telling it up front what is true
here, one host and no other workers, silences that; it must happen before libtpu loads, i.e.
before JAX's backends start. `aot` names its topology explicitly, so these do not affect it.
"""

from __future__ import annotations

import glob
import os
from typing import MutableMapping

QUIET_DEFAULTS = {
    "TPU_SKIP_MDS_QUERY": "1",  # no metadata-server query (JAX sets this too, but after libtpu may print)
    "TPU_HOST_BOUNDS": "1,1,1",  # one host
    "TPU_WORKER_HOSTNAMES": "localhost",  # and no other workers
}


def host_has_tpu() -> bool:
    """TPU chips appear as /dev/accel* (v4 and earlier) or /dev/vfio/N (v5 and later)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_without_tpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """On a host without a TPU, set QUIET_DEFAULTS where the environment leaves them unset.
    Returns whether it did. Harmless when libtpu is not installed."""
    if host_has_tpu():
        return False
    for key, value in QUIET_DEFAULTS.items():
        environ.setdefault(key, value)
    return True
