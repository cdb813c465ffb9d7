"""Model checkpoint directories: parameters (Orbax) plus the model config, in one folder.

Layout of a params checkpoint written by `save_params` (used by `convert` and for exported models):
    DIR/esm3_jax.yaml    kind (esm3 | structure-encoder | structure-decoder) and the model config
    DIR/params/          Orbax PyTree checkpoint of the (unboxed) parameter tree
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml

META_FILE = "esm3_jax.yaml"
# The kinds of model a params checkpoint can hold (its esm3_jax.yaml says which).
ESM3_KIND, ENCODER_KIND, DECODER_KIND = "esm3", "structure-encoder", "structure-decoder"


def save_params(directory: str | Path, params: Any, config: dict, kind: str) -> Path:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    (directory / META_FILE).write_text(yaml.safe_dump({"kind": kind, "model": config}, sort_keys=False))
    return directory


def load_params(directory: str | Path) -> tuple[str, dict, Any]:
    """(kind, model config dict, params as numpy) from a params checkpoint or a training run."""
    directory = Path(directory).absolute()
    meta_path = directory / META_FILE
    if not meta_path.is_file() and directory.is_dir():
        # A training run (its output_dir or checkpoints/ folder): the latest step's params.
        from esm3_jax.train.checkpoint import checkpoint_dir_of, read_checkpoint

        ckpt_dir = checkpoint_dir_of(directory)
        if any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            info = read_checkpoint(ckpt_dir)
            return "esm3", info["config"]["model"], jax.tree.map(np.asarray, info["state"]["params"])
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{directory}: not an esm3-jax checkpoint (no {META_FILE}); make one with `esm3-jax convert` "
            "or point at a training run's checkpoint directory"
        )
    meta = yaml.safe_load(meta_path.read_text())
    if not isinstance(meta, dict) or "kind" not in meta or "model" not in meta:
        raise ValueError(f"{meta_path}: malformed checkpoint metadata (needs 'kind' and 'model')")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params")
    return meta["kind"], meta["model"], jax.tree.map(np.asarray, params)
