"""Starting a run from existing weights (`train.init_from`): a converted release or any esm3-jax run.

The checkpoint's saved model config is checked against the run's first, key by key, so a wrong
size fails with the key that differs instead of an Orbax shape error deep in a restore. Then the
parameters are read straight into the run's shardings (whatever mesh wrote them), and the run
gets a fresh optimizer state and step 0.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from esm3_jax.config import ConfigError, to_dict
from esm3_jax.model.config import ModelConfig, model_config_from_dict

# Model keys that say how the parameters are *computed with*, not what they are: the same
# weights are valid under any value of these. compute_dtype: the activations' dtype (parameters
# stay param_dtype); remat: what the backward pass recomputes; attention: which kernel computes
# the same softmax attention; geom_chunk_bytes: the geometric kernel's blocking.
# Every other key must match: d_model, n_heads, n_layers, v_heads, n_layers_geom and ffn_expansion
# set parameter shapes (n_heads too: the qkv kernel is (d, 3, heads, d_head)); scale_residue
# changes no shape but what every residual branch is multiplied by, so weights trained under one
# setting compute a different function under the other; param_dtype is the stored dtype. A key
# added later is compared too unless it is listed here: a false mismatch is a clear error, a
# false match a silently wrong model.
EXECUTION_ONLY = ("compute_dtype", "remat", "attention", "geom_chunk_bytes")
# scan_layers changes the tree (one stacked `trunk/blocks/block` vs `trunk/block_{j}` per plain
# block) but not the weights: the tree is converted on the host (`convert_layer_layout`).
TREE_LAYOUT = ("scan_layers",)


def check_model_matches(saved: dict, cfg: ModelConfig, source: str) -> ModelConfig:
    """The checkpoint's ModelConfig; ConfigError naming the first key that makes its weights
    unusable for `cfg` (execution-only keys and scan_layers may differ)."""
    try:
        saved_cfg = model_config_from_dict(dict(saved), f"{source} (saved model config)")
    except ValueError as e:
        raise ConfigError(f"train.init_from={source}: its model config cannot be read: {e}") from e
    ours, theirs = to_dict(cfg), to_dict(saved_cfg)
    for key, value in ours.items():
        if key in EXECUTION_ONLY or key in TREE_LAYOUT:
            continue
        if theirs[key] != value:
            raise ConfigError(
                f"train.init_from={source}: model.{key}: checkpoint has {theirs[key]!r}, config has {value!r} "
                f"(set model.{key}={theirs[key]} to fine-tune these weights)"
            )
    return saved_cfg


def convert_layer_layout(params: dict, saved: ModelConfig, cfg: ModelConfig) -> dict:
    """Host params of `saved`'s layer layout in `cfg`'s: stack the plain blocks for scan_layers,
    or split the stack into trunk/block_{j} (j counts plain blocks, after the geometric ones)."""
    if saved.scan_layers == cfg.scan_layers:
        return params
    n_plain = cfg.n_layers - cfg.n_layers_geom
    if n_plain == 0:
        return params
    trunk = dict(params["trunk"])
    if saved.scan_layers:  # stacked -> one subtree per block
        stack = trunk.pop("blocks")["block"]
        for j in range(n_plain):
            trunk[f"block_{j}"] = jax.tree.map(lambda a, j=j: np.asarray(a)[j], stack)
    else:
        layers = [trunk.pop(f"block_{j}") for j in range(n_plain)]
        trunk["blocks"] = {"block": jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *layers)}
    return {**params, "trunk": trunk}


def check_init_from(path: str, cfg: ModelConfig) -> tuple[ModelConfig, dict]:
    """(the checkpoint's ModelConfig, where its params are) after checking, from metadata alone,
    that `path` holds ESM3 weights `cfg` can start from: cheap enough to run before any compile."""
    # Imported here, not above: train/setup.py imports this module, and a train step that starts
    # from scratch (bench, launch/gpu_check.sh) then needs no Orbax/TensorStore.
    from esm3_jax.compat import params_io

    try:
        kind, saved, where = params_io.params_source(path)
    except (FileNotFoundError, params_io.CheckpointError) as e:
        raise ConfigError(f"train.init_from={path}: {e}") from e
    if kind != params_io.ESM3_KIND:
        raise ConfigError(f"train.init_from={path}: holds a {kind} model, not an ESM3 one")
    return check_model_matches(saved, cfg, str(path)), where


def load_initial_params(path: str, cfg: ModelConfig, target: Any) -> Any:
    """The parameters at `path` (a params checkpoint or a training run), in `target`'s shapes and
    shardings (a tree of ShapeDtypeStructs carrying NamedShardings)."""
    from esm3_jax.compat import params_io

    saved_cfg, where = check_init_from(path, cfg)
    if saved_cfg.scan_layers == cfg.scan_layers:
        # Each process reads its own shards straight into place: no host ever holds the whole model.
        return params_io.restore_params(where, target)
    # A different layer layout is restacked on the host, then placed shard by shard.
    host = convert_layer_layout(params_io.restore_params(where), saved_cfg, cfg)
    return jax.tree.map(
        lambda a, t: jax.make_array_from_callback(t.shape, t.sharding, lambda idx: np.asarray(a[idx], t.dtype)),
        host, target)


def validate_trainable(patterns: tuple[str, ...], paths: list[str]) -> None:
    """ConfigError for a pattern that selects no parameter (a typo would freeze everything)."""
    for pattern in patterns:
        if not any(re.search(pattern, p) for p in paths):
            shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise ConfigError(f"train.trainable: pattern {pattern!r} matches no parameter (paths look like: {shown})")
