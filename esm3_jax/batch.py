"""The batch format: the one owner of the keys, shapes, dtypes and pad values that pass between
the data pipeline, the model, the train and eval steps, AOT compilation, inference and the benches.

A training batch holds, per position (B rows x L positions):
  model inputs   one array per track, the pLDDT values, backbone coordinates, chain and sequence ids
  targets        the uncorrupted tokens of every track that carries a loss (`<track>_target`)
  loss masks     the positions each track's loss is taken at (`<track>_loss_mask`)
`sequence_id` tells packed proteins apart within a row; 0 marks padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax import tokens as T


@dataclasses.dataclass(frozen=True)
class Field:
    """One per-position array: its shape after (batch, length), its dtype, its padding value."""

    trailing: tuple[int, ...]
    dtype: Any
    pad: Any


# The model's keyword inputs, in its argument order.
MODEL_INPUTS: dict[str, Field] = {
    "sequence_tokens": Field((), np.int32, T.SEQUENCE_PAD),
    "structure_tokens": Field((), np.int32, T.STRUCTURE_PAD),
    "ss8_tokens": Field((), np.int32, T.SS8_PAD),
    "sasa_tokens": Field((), np.int32, T.SASA_PAD),
    "function_tokens": Field((T.FUNCTION_DEPTH,), np.int32, T.FUNCTION_PAD),
    "residue_annotation_tokens": Field((T.RESIDUE_MAX_ANNOTATIONS,), np.int32, T.RESIDUE_PAD),
    "average_plddt": Field((), np.float32, 0.0),
    "per_res_plddt": Field((), np.float32, 0.0),
    "structure_coords": Field((3, 3), np.float32, np.nan),  # N, CA, C; NaN where absent
    "chain_id": Field((), np.int32, 0),
    "sequence_id": Field((), np.int32, 0),
}
INPUT_KEYS: tuple[str, ...] = tuple(MODEL_INPUTS)
# The inputs that carry a track (and so fix batch and length); the rest only annotate it.
TRACK_KEYS: tuple[str, ...] = tuple(k for k in INPUT_KEYS if k not in ("average_plddt", "per_res_plddt", "chain_id", "sequence_id"))

# The tracks that carry a loss, in the order metrics are reported, and the input each one noises.
TRACK_INPUTS: dict[str, str] = {
    "sequence": "sequence_tokens",
    "structure": "structure_tokens",
    "ss8": "ss8_tokens",
    "sasa": "sasa_tokens",
    "function": "function_tokens",
    "residue_annotation": "residue_annotation_tokens",
}
TRACKS: tuple[str, ...] = tuple(TRACK_INPUTS)

# Every array of a training batch: the model inputs, then each track's target, then its loss mask.
TRAINING_FIELDS: dict[str, Field] = {
    **MODEL_INPUTS,
    **{f"{t}_target": MODEL_INPUTS[k] for t, k in TRACK_INPUTS.items()},
    **{f"{t}_loss_mask": Field((), np.bool_, False) for t in TRACKS},
}
BATCH_KEYS: tuple[str, ...] = tuple(TRAINING_FIELDS)


def shapes(batch: int, length: int, fields: dict[str, Field] = TRAINING_FIELDS) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of a batch of `batch` rows of `length` positions."""
    return {k: ((batch, length, *f.trailing), f.dtype) for k, f in fields.items()}


def stack_proteins(proteins: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Single proteins (the same model-input keys each, length first) right-padded into one batch,
    each array with its own pad value: the `forward` and `generate` verbs' .npz format."""
    L = max(len(p["sequence_tokens"]) for p in proteins)
    return {k: np.stack([np.pad(p[k], [(0, L - len(p[k]))] + [(0, 0)] * (p[k].ndim - 1),
                                constant_values=MODEL_INPUTS[k].pad) for p in proteins]).astype(MODEL_INPUTS[k].dtype)
            for k in proteins[0]}


def abstract_batch(batch: int, length: int, sharding_of=lambda ndim: None) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch's shapes and dtypes, without data (what AOT compiles the step for);
    `sharding_of(ndim)` gives each array's sharding."""
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding_of(len(s))) for k, (s, d) in shapes(batch, length).items()}


def example_inputs(batch: int, length: int) -> dict[str, jax.Array]:
    """Zero model inputs of the right shapes and dtypes (every row one protein): enough to create
    the parameters."""
    return {k: (jnp.ones if k == "sequence_id" else jnp.zeros)(s, d)
            for k, (s, d) in shapes(batch, length, MODEL_INPUTS).items()}


def random_inputs(batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Model inputs with every track filled, plus backbone coordinates (a random walk at
    protein-like spacing): what the benches and parity checks feed both implementations."""
    rng = np.random.default_rng(seed)
    B, L = batch, length
    seq = rng.integers(4, 24, size=(B, L)).astype(np.int32)
    seq[:, 0], seq[:, -1] = T.SEQUENCE_BOS, T.SEQUENCE_EOS
    ca = np.cumsum(rng.normal(size=(B, L, 3)) * 2.2, axis=1)
    coords = np.stack([ca + rng.normal(size=ca.shape), ca, ca + rng.normal(size=ca.shape)], axis=2)
    ra = rng.integers(0, T.RESIDUE_VOCAB_SIZE, size=(B, L, 16))
    ra[rng.random((B, L, 16)) < 0.9] = 0
    return dict(
        sequence_tokens=seq,
        structure_tokens=rng.integers(0, 4096, size=(B, L)).astype(np.int32),
        ss8_tokens=rng.integers(3, 11, size=(B, L)).astype(np.int32),
        sasa_tokens=rng.integers(3, 19, size=(B, L)).astype(np.int32),
        function_tokens=rng.integers(0, 260, size=(B, L, 8)).astype(np.int32),
        residue_annotation_tokens=ra.astype(np.int32),
        average_plddt=np.full((B, L), 0.9, np.float32),
        per_res_plddt=rng.random((B, L)).astype(np.float32),
        structure_coords=coords.astype(np.float32),
        chain_id=np.zeros((B, L), np.int32),
        sequence_id=np.ones((B, L), np.int32),
    )


# The id a masked position of each track holds (0 where the track has no mask token of its own).
_MASK_IDS = {"sequence": T.SEQUENCE_MASK, "structure": T.STRUCTURE_MASK}


def synthetic_train_batch(batch: int, length: int, mask_rate: float = 0.3, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of random data: every track filled, ~`mask_rate` of positions masked."""
    rng = np.random.default_rng(seed)
    x = random_inputs(batch, length, seed)
    out = dict(x)
    masks = {}
    for track, key in TRACK_INPUTS.items():
        m = rng.random((batch, length)) < mask_rate
        m[:, 0] = m[:, -1] = False
        masks[track] = m
        out[f"{track}_target"] = x[key]
        out[f"{track}_loss_mask"] = m
        mm = m if x[key].ndim == 2 else m[..., None]
        out[key] = np.where(mm, _MASK_IDS.get(track, 0), x[key]).astype(np.int32)
    out["structure_coords"] = np.where(masks["structure"][..., None, None], np.nan, x["structure_coords"]).astype(np.float32)
    return out
