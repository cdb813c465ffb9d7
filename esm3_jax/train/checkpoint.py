"""Checkpoints of a training run: Orbax CheckpointManager, one step = everything needed to resume.

Each saved step holds four items:
  state      params, optimizer state, step, RNG and the non-finite counters (sharded arrays)
  data_iter  the Grain iterator's position (one file per process)
  config     the fully resolved config, as JSON
  meta       step, a checksum of the state's bytes, wall time

Saves are asynchronous (the arrays are copied to host before `save` returns, then written in
the background) and atomic: Orbax writes into a temporary folder and renames it when done, so a
process killed mid-save leaves no step that looks complete. On restore the checksum is
recomputed; a step that fails to read or does not match is reported and the previous one used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from esm3_jax.compat.params_io import CheckpointError, checkpoint_dir_of, read_checkpoint

log = logging.getLogger(__name__)


def _words_u32(x: jax.Array) -> jax.Array:
    """The raw bytes of an array as uint32 words (narrower types widened, wider ones split)."""
    itemsize = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
    narrow = {2: jnp.uint16, 1: jnp.uint8}[itemsize]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


@jax.jit
def _checksum_u32(leaves: list[jax.Array]) -> jax.Array:
    # Position-weighted sum of the words, mod 2**32, mixed across leaves: any changed bit changes
    # it, and it reduces on the devices where the (sharded) arrays live, with no gather to a host.
    total = jnp.uint32(0)
    for i, x in enumerate(leaves):
        u = _words_u32(x)
        pos = jax.lax.iota(jnp.uint32, u.size).reshape(u.shape)
        weights = pos * jnp.uint32(2654435761) + jnp.uint32(2 * i + 1)
        total = total * jnp.uint32(1000003) + jnp.sum(u * weights, dtype=jnp.uint32)
    return total


def state_checksum(tree: Any) -> str:
    """An 8-hex-digit checksum of every byte of a (possibly sharded, multi-host) pytree of arrays."""
    value = _checksum_u32(jax.tree.leaves(tree))
    return f"{int(np.asarray(value.addressable_data(0))):08x}"


def params_fingerprint(params: Any) -> str:
    """sha256 over the parameters' bytes, leaves in path order, on the host (checkpoint-info)."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class Checkpointer:
    """Saves and restores train states in `directory`, keeping the last `keep` steps."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # leftovers of a save that was killed mid-way
                create=True,
            ),
        )
        self._unreadable: set[int] = set()  # steps restore_latest had to skip

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: dict[str, Any], data_iter: Any, config: dict) -> None:
        """Start saving (returns once the arrays are on the host; the writing goes on behind)."""
        if step in self._unreadable:
            # A step restore_latest could not read, reached again after resuming from an earlier
            # one: replaced (Orbax refuses to save over an existing step, which ended the run).
            log.warning("replacing the unreadable checkpoint %s/%d", self.directory, step)
            self._mngr.delete(int(step))
            self._unreadable.discard(step)
        meta = {"step": int(step), "checksum": state_checksum(state), "time": time.time(),
                "process_count": jax.process_count()}
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                     meta=ocp.args.JsonSave(meta))
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, abstract_state: dict[str, Any], data_iter: Any) -> tuple[int, dict] | None:
        """(step, state) of the newest step that reads back intact, with `data_iter` moved to its
        position; None when there is no checkpoint. Broken steps are skipped with a warning."""
        for step in reversed(self.all_steps()):
            try:
                items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
                if data_iter is not None:
                    items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
                restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
                expected = restored.meta["checksum"]
                actual = state_checksum(restored.state)
                if actual != expected:
                    raise CheckpointError(f"state checksum {actual} does not match the saved {expected}")
                return step, restored.state
            except Exception as e:  # any failure to read means this step cannot be trusted
                msg = (f"checkpoint {self.directory}/{step} is incomplete or corrupted "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); trying the previous one")
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                self._unreadable.add(step)
        return None

    def saved_config(self) -> dict | None:
        """The resolved config stored with the newest step (None if it cannot be read)."""
        steps = self.all_steps()
        if not steps:
            return None
        try:
            return self._mngr.restore(steps[-1], args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception:  # a broken newest step: restore_latest will report it
            return None

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def format_info(info: dict[str, Any]) -> str:
    cfg, meta = info["config"], info["meta"]
    params = info["state"]["params"]
    n_params = sum(int(np.prod(np.shape(p))) for p in jax.tree.leaves(params))
    m, t, d, mesh = cfg.get("model", {}), cfg.get("train", {}), cfg.get("data", {}), cfg.get("mesh", {})
    lines = [
        f"step: {info['step']} (available: {', '.join(map(str, info['steps']))})",
        f"model: d_model={m.get('d_model')} n_heads={m.get('n_heads')} n_layers={m.get('n_layers')} "
        f"params={n_params:,} compute_dtype={m.get('compute_dtype')}",
        f"train: steps={t.get('steps')} learning_rate={t.get('learning_rate')} "
        f"grad_accum_steps={t.get('grad_accum_steps')} output_dir={t.get('output_dir')}",
        f"data: batch_size={d.get('batch_size')} max_length={d.get('max_length')}",
        f"mesh: data={mesh.get('data')} fsdp={mesh.get('fsdp')} tensor={mesh.get('tensor')}",
        f"non-finite steps skipped: {int(np.asarray(info['state']['nonfinite_total']))}",
        f"saved: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(meta['time']))}; checksum {meta['checksum']}",
        f"fingerprint: {params_fingerprint(params)}",
    ]
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a run's output_dir, or its checkpoints/ folder")
    parser.add_argument("--step", type=int, default=None, help="which step (default: the latest)")
    parser.add_argument("--json", action="store_true", help="print the resolved config as JSON too")


def cli_main(args: argparse.Namespace) -> int:
    info = read_checkpoint(checkpoint_dir_of(args.directory), args.step)
    print(format_info(info))
    if args.json:
        print(json.dumps(info["config"], indent=2))
    return 0
