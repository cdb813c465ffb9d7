"""Multi-process start-up: one process per host (TPU VM, GPU node) joined by jax.distributed.

Three ways in, tried in order:
  1. explicit --coordinator HOST:PORT --num-processes N --process-id I;
  2. SLURM: under `srun` with more than one task, SLURM_PROCID / SLURM_NTASKS / the step's node
     list give the same three values (the coordinator is the first node, port ESM3_JAX_PORT or 12355);
  3. a single process: nothing to do (a TPU pod slice is detected by jax.distributed itself when
     ESM3_JAX_AUTO_DISTRIBUTED=1 is set, as launch/tpu_pod.sh does).
Must run before anything touches a JAX device.
"""

from __future__ import annotations

import logging
import os
import re

import jax

log = logging.getLogger(__name__)

DEFAULT_PORT = 12355


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as 'gpu[012-015,020],cpu1' -> 'gpu012'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_settings(env: dict[str, str] | None = None) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from SLURM's environment, or None outside srun."""
    env = dict(os.environ if env is None else env)
    if "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    port = int(env.get("ESM3_JAX_PORT", DEFAULT_PORT))
    return f"{_first_slurm_host(nodelist)}:{port}", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join the run's processes (see the module docstring); a no-op for a single process."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together: give all three or none")
    if coordinator is None:
        slurm = slurm_settings()
        if slurm is not None:
            coordinator, num_processes, process_id = slurm
        elif os.environ.get("ESM3_JAX_AUTO_DISTRIBUTED") == "1":
            jax.distributed.initialize()  # TPU pod slices and other clusters jax detects itself
            return
        else:
            return
    if num_processes == 1:
        return
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
    if ":" not in coordinator:
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    # CPU devices of different processes need a collectives backend (harmless on accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("joining %d processes at %s as process %d", num_processes, coordinator, process_id)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)



def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches this point; a no-op for one process.

    Goes through the coordination service rather than a device collective: processes that finish
    compiling minutes apart (a busy host, a cold compilation cache) would otherwise meet first in
    a collective, and the CPU (gloo) collectives give up after 30 s.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client has no public handle

    jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
