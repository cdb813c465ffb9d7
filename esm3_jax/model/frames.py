"""Rigid backbone frames from N/CA/C coordinates (ESM3_SPEC section 3.1), in fp32.

Convention (the reference's): origin at CA, x-axis along CA - C (so C sits on -x), N in the +y half
of the xy-plane, z = x cross y. The rotation's columns are the axes, so R @ v_local + t = v_global.
"""

from __future__ import annotations

import jax.numpy as jnp

# Coordinates at or beyond this magnitude are treated as missing (same bound as the reference,
# applied to the absolute value so that absurd negative coordinates are rejected too).
MAX_COORDINATE = 1e6


def gram_schmidt(x_axis: jnp.ndarray, xy_plane: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
    """Rotation (..., 3, 3) whose first column is x_axis/|x_axis| and whose xy-plane holds xy_plane."""
    e1 = x_axis / jnp.sqrt(jnp.sum(x_axis**2, axis=-1, keepdims=True) + eps)
    u = xy_plane - e1 * jnp.sum(e1 * xy_plane, axis=-1, keepdims=True)
    e2 = u / jnp.sqrt(jnp.sum(u**2, axis=-1, keepdims=True) + eps)
    e3 = jnp.cross(e1, e2)
    return jnp.stack([e1, e2, e3], axis=-1)


def backbone_frames(
    coords_BxLx3x3: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Frames for every residue from (N, CA, C) coordinates; NaN marks a missing atom.

    Returns (rot_BxLx3x3, trans_BxLx3, mask_BxL). A residue with any missing backbone atom gets the
    "black-hole" frame: the frame built from the protein's mean N, CA and C (identity rotation and
    zero translation when the protein has no coordinates at all) and mask False. Keeping every
    rotation well defined stops geometric attention from collapsing on frameless residues.
    """
    coords = coords_BxLx3x3[..., :3, :].astype(jnp.float32)
    finite = jnp.isfinite(coords) & (jnp.abs(coords) < MAX_COORDINATE)
    mask_BxL = jnp.all(finite, axis=(-1, -2))
    # Zero the missing residues before any arithmetic so no NaN reaches values or gradients.
    coords = jnp.where(mask_BxL[..., None, None], coords, 0.0)

    n_valid_B = jnp.sum(mask_BxL, axis=-1).astype(jnp.float32)
    mean_Bx3x3 = jnp.sum(coords, axis=1) / (n_valid_B[:, None, None] + 1e-8)
    mean_rot_Bx3x3 = gram_schmidt(
        mean_Bx3x3[:, 1] - mean_Bx3x3[:, 2], mean_Bx3x3[:, 0] - mean_Bx3x3[:, 1]
    )
    has_any_B = n_valid_B > 0
    mean_rot_Bx3x3 = jnp.where(has_any_B[:, None, None], mean_rot_Bx3x3, jnp.eye(3, dtype=jnp.float32))

    n, ca, c = coords[..., 0, :], coords[..., 1, :], coords[..., 2, :]
    rot_BxLx3x3 = gram_schmidt(ca - c, n - ca)
    rot_BxLx3x3 = jnp.where(mask_BxL[..., None, None], rot_BxLx3x3, mean_rot_Bx3x3[:, None])
    trans_BxLx3 = jnp.where(mask_BxL[..., None], ca, mean_Bx3x3[:, None, 1])
    return rot_BxLx3x3, trans_BxLx3, mask_BxL
