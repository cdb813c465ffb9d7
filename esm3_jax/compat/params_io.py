"""Parameters on disk: params checkpoints, and the parameters of a training run's checkpoints.

Layout of a params checkpoint written by `save_params` (used by `convert` and for exported models):
    DIR/esm3_jax.yaml    kind (esm3 | structure-encoder | structure-decoder | function-decoder) and the model config
    DIR/params/          Orbax PyTree checkpoint of the (unboxed) parameter tree
A training run's checkpoints (train/checkpoint.py writes them) are read here too, to the host, so
that inference and `convert --export` take either without knowing about training.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

from esm3_jax.model.lora import merge_adapters

META_FILE = "esm3_jax.yaml"
# The kinds of model a params checkpoint can hold (its esm3_jax.yaml says which).
ESM3_KIND, ENCODER_KIND, DECODER_KIND = "esm3", "structure-encoder", "structure-decoder"
FUNCTION_DECODER_KIND = "function-decoder"


def save_params(directory: str | Path, params: Any, config: dict, kind: str) -> Path:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    (directory / META_FILE).write_text(yaml.safe_dump({"kind": kind, "model": config}, sort_keys=False))
    return directory


@contextlib.contextmanager
def _quiet_reads():
    """Reading some items of a checkpoint read-only: Orbax logs a warning per item left unread and
    for the read-only options themselves, none of which is news to the user."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Reading to host numpy needs no shardings; Orbax warns that it has none to apply.
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        absl.setLevel(level)


def load_params(directory: str | Path) -> tuple[str, dict, Any]:
    """(kind, model config dict, params as numpy) from a params checkpoint or a training run
    (its output_dir or checkpoints/ folder: the latest step's parameters)."""
    kind, config, where = params_source(directory)
    return kind, config, restore_params(where)


def params_source(directory: str | Path) -> tuple[str, dict, dict]:
    """(kind, model config dict, where the params live) of a params checkpoint or a training run,
    reading only metadata (no arrays): what a caller checks before it restores anything.

    `where` is {"params_dir": ...} for a params checkpoint, {"run_dir": ..., "step": N} for a run
    (its latest step); `restore_params` takes it."""
    directory = Path(directory).absolute()
    meta_path = directory / META_FILE
    if meta_path.is_file():
        meta = yaml.safe_load(meta_path.read_text())
        if not isinstance(meta, dict) or "kind" not in meta or "model" not in meta:
            raise ValueError(f"{meta_path}: malformed checkpoint metadata (needs 'kind' and 'model')")
        return meta["kind"], meta["model"], {"params_dir": directory / "params"}
    if directory.is_dir():
        ckpt_dir = checkpoint_dir_of(directory)
        if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            with _quiet_reads():
                mngr = ocp.CheckpointManager(ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
            try:
                steps = sorted(mngr.all_steps())
                if not steps:
                    raise CheckpointError(f"{ckpt_dir}: no complete checkpoint steps found")
                with _quiet_reads():
                    config = mngr.restore(steps[-1], args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            finally:
                mngr.close()
            where = {"run_dir": ckpt_dir.absolute(), "step": steps[-1]}
            train = config.get("train") or {}
            if train.get("lora_rank"):
                # A LoRA run: its parameters are the base kernels and their adapters.
                where["lora_alpha"] = float(train.get("lora_alpha", 16.0))
            return ESM3_KIND, config["model"], where
    raise FileNotFoundError(
        f"{directory}: not an esm3-jax checkpoint (no {META_FILE}); make one with `esm3-jax convert` "
        "or point at a training run's output_dir or checkpoints/ folder"
    )


def restore_params(where: dict, target: Any = None) -> Any:
    """The parameter tree at `where` (from `params_source`).

    target None: host numpy arrays, whatever mesh wrote them (Orbax needs no shardings to read).
    target a tree of jax.ShapeDtypeStruct with shardings: each array is read straight into that
    layout, each process reading only its own shards, whatever mesh (or device count) saved it;
    of a training run's state only the parameters are read, not the optimizer's moments.
    A LoRA run's parameters come back with the adapters merged: W + (alpha / rank) A @ B.
    """
    if "lora_alpha" in where:
        # A LoRA run's adapters are merged into their kernels on the host (the plain model's
        # tree, what every reader of parameters expects), then placed shard by shard.
        host = merge_adapters(restore_params({k: v for k, v in where.items() if k != "lora_alpha"}),
                              where["lora_alpha"])
        if target is None:
            return host
        return jax.tree.map(lambda a, t: jax.make_array_from_callback(
            t.shape, t.sharding, lambda idx: np.asarray(a[idx], t.dtype)), host, target)
    to_host = target is None
    with _quiet_reads():
        if "params_dir" in where:
            with ocp.StandardCheckpointer() as ckptr:
                params = ckptr.restore(where["params_dir"]) if to_host else ckptr.restore(where["params_dir"], target)
            return jax.tree.map(np.asarray, params) if to_host else params
        # The handler named up front: without it the manager has no metadata for "state" to give.
        mngr = ocp.CheckpointManager(where["run_dir"], item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                     options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            item = dict(mngr.item_metadata(where["step"])["state"]["params"]) if to_host else target
            restore_args = jax.tree.map(
                (lambda _: ocp.RestoreArgs(restore_type=np.ndarray)) if to_host
                else (lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype)),
                item)
            out = mngr.restore(where["step"], args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": item}, restore_args={"params": restore_args}, partial_restore=True)))
        finally:
            mngr.close()
        return out.state["params"]


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected."""


def read_checkpoint(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """Read a checkpoint's step, config, meta and parameters onto the host (numpy), for inspection."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint folder")
    with _quiet_reads():
        # The handlers named up front: a fresh process has none registered for the items, and
        # without them the manager gives no metadata for "state" (so no way to read it to host).
        mngr = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
    steps = sorted(mngr.all_steps())
    if not steps:
        raise CheckpointError(f"{directory}: no complete checkpoint steps found")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"{directory}: no step {step}; available: {steps}")
    with _quiet_reads():
        meta_tree = dict(mngr.item_metadata(step)["state"])
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta_tree)
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=meta_tree, restore_args=restore_args),
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    mngr.close()
    return {"step": step, "steps": steps, "state": out.state, "config": out.config, "meta": out.meta}


def checkpoint_dir_of(path: str | Path) -> Path:
    """Accept a run's output_dir as well as its checkpoints/ folder."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path
