"""Batched ESM3 forward passes over checkpoints and .npz files (`esm3-jax forward`).

Inputs are validated on the host before anything is compiled, so a bad file fails with the key
and the position at fault instead of a silent gather of a wrong row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.runtime import cpu_matmul
from esm3_jax import tokens as T
from esm3_jax.model.config import model_config_from_dict
from esm3_jax.model.config import ModelConfig
from esm3_jax.batch import INPUT_KEYS, TRACK_KEYS
from esm3_jax.model.esm3 import ESM3


class InputError(ValueError):
    """Forward inputs that the model cannot read; the message names the key and the problem."""


# key -> (trailing shape after (B, L), inclusive id range or None for floats)
_INPUT_SPECS: dict[str, tuple[tuple[int, ...], tuple[int, int] | None]] = {
    "sequence_tokens": ((), (0, len(T.SEQUENCE_VOCAB) - 1)),
    "structure_tokens": ((), (-1, T.STRUCTURE_VOCAB_SIZE - 1)),
    "ss8_tokens": ((), (0, T.SS8_VOCAB_SIZE - 1)),
    "sasa_tokens": ((), (0, T.SASA_VOCAB_SIZE - 1)),
    "function_tokens": ((T.FUNCTION_DEPTH,), (0, T.FUNCTION_VOCAB_SIZE - 1)),
    "residue_annotation_tokens": ((T.RESIDUE_MAX_ANNOTATIONS,), (0, T.RESIDUE_VOCAB_SIZE - 1)),
    "average_plddt": ((), None),
    "per_res_plddt": ((), None),
    "structure_coords": ((None, 3), None),
    "chain_id": ((), (np.iinfo(np.int32).min, np.iinfo(np.int32).max)),
    "sequence_id": ((), (np.iinfo(np.int32).min, np.iinfo(np.int32).max)),
}


def validate_inputs(inputs: dict[str, Any], source: str = "inputs") -> dict[str, np.ndarray]:
    """Check names, shapes, dtypes and id ranges; return int32/float32 numpy arrays."""
    unknown = sorted(set(inputs) - set(INPUT_KEYS))
    if unknown:
        raise InputError(f"{source}: unknown input(s) {unknown}; expected names from {list(INPUT_KEYS)}")
    if not inputs:
        raise InputError(f"{source}: no inputs; give at least one of {list(INPUT_KEYS)}")
    out: dict[str, np.ndarray] = {}
    batch_shape = None
    for key in INPUT_KEYS:
        if key not in inputs:
            continue
        a = np.asarray(inputs[key])
        trailing, id_range = _INPUT_SPECS[key]
        if a.ndim != 2 + len(trailing) or any(t is not None and a.shape[2 + i] != t for i, t in enumerate(trailing)):
            want = "(B, L" + "".join(f", {t if t is not None else '>=3'}" for t in trailing) + ")"
            raise InputError(f"{source}: '{key}' has shape {a.shape}, expected {want}")
        if key == "structure_coords" and a.shape[2] < 3:
            raise InputError(f"{source}: 'structure_coords' needs at least the N, CA, C atoms, got {a.shape[2]}")
        if batch_shape is None:
            batch_shape = a.shape[:2]
        elif a.shape[:2] != batch_shape:
            raise InputError(
                f"{source}: track length mismatch: '{key}' is {a.shape[:2]} but earlier tracks are {batch_shape} (batch, length)"
            )
        if id_range is None:
            if a.dtype.kind not in "fiub":
                raise InputError(f"{source}: '{key}' must be numeric, got dtype {a.dtype}")
            a = a.astype(np.float32)
            if key != "structure_coords" and not np.all(np.isfinite(a)):
                bad = np.argwhere(~np.isfinite(a))[0]
                raise InputError(f"{source}: '{key}' has a non-finite value at (row, position) {tuple(bad)}")
        else:
            if a.dtype.kind not in "iub":
                raise InputError(f"{source}: '{key}' must hold integer ids, got dtype {a.dtype}")
            lo, hi = id_range
            bad = np.argwhere((a < lo) | (a > hi))
            if len(bad):
                where = tuple(int(i) for i in bad[0])
                raise InputError(
                    f"{source}: '{key}' id {int(a[where])} at index {where} is outside [{lo}, {hi}]"
                )
            a = a.astype(np.int32)
        out[key] = a
    if not any(k in out for k in TRACK_KEYS):
        raise InputError(f"{source}: needs at least one track (tokens or coordinates), got only {sorted(out)}")
    return out


def load_esm3(checkpoint: str | Path, compute_dtype: str | None = None) -> tuple[ModelConfig, Any]:
    # Imported here: a forward pass on parameters already in memory (bench, launch/gpu_check.sh)
    # then needs no Orbax/TensorStore.
    from esm3_jax.compat.params_io import load_params

    kind, config, params = load_params(checkpoint)
    if kind != "esm3":
        raise ValueError(f"{checkpoint}: holds a '{kind}' model, not esm3")
    cfg = model_config_from_dict(config, f"{checkpoint}")
    if compute_dtype:
        cfg = dataclasses.replace(cfg, compute_dtype=compute_dtype)
    return cfg, params


def make_forward(cfg: ModelConfig):
    """A jitted `(params, inputs) -> outputs`; absent inputs are left out (compiled per key set).

    One function per (config, backend) in a process: jit caches its compiled programs on the
    function object, so a fresh one per call would trace and compile again every time (seconds
    each). Sharing is safe: the function closes over nothing but the frozen config, and jit
    keys its programs by the params' and inputs' structure, shapes and dtypes."""
    return _make_forward(cfg, jax.default_backend())


@functools.lru_cache(maxsize=16)
def _make_forward(cfg: ModelConfig, backend: str):
    model = ESM3(cfg)
    return jax.jit(lambda params, inputs: model.apply({"params": params}, **inputs),
                   compiler_options=cpu_matmul.compiler_options(backend, cpu_matmul.DEFAULT))


def forward(cfg: ModelConfig, params: Any, inputs: dict[str, np.ndarray], batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Run the model over validated inputs in chunks of `batch_size` rows."""
    fn = make_forward(cfg)
    params = jax.device_put(params)
    n = next(iter(inputs.values())).shape[0]
    step = batch_size or n
    chunks = []
    for start in range(0, n, step):
        part = {k: jnp.asarray(v[start : start + step]) for k, v in inputs.items()}
        chunks.append(jax.tree.map(np.asarray, fn(params, part)))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="esm3-jax checkpoint directory (from `convert` or training)")
    p.add_argument("--inputs", required=True, help=".npz with keys named like the reference forward's arguments")
    p.add_argument("--out", required=True, help="output .npz (sequence_logits, ..., embeddings)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward call (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: the checkpoint's)")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an inputs .npz; a missing or unreadable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such inputs file")
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise InputError(f"{path}: not a readable .npz ({e})") from e


def cli_main(args: argparse.Namespace) -> int:
    path = Path(args.inputs)
    inputs = validate_inputs(read_npz(path), str(path))
    cfg, params = load_esm3(args.checkpoint, args.dtype)
    out = forward(cfg, params, inputs, args.batch_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **out)
    b, l = next(iter(inputs.values())).shape[:2]
    print(f"forward: {b} x {l} tokens -> {args.out} ({', '.join(sorted(out))})")
    return 0
