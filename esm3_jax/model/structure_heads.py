"""The structure decoder's output heads (ESM3_SPEC 5.3): frames and backbone, pairwise logits,
pLDDT, and the pAE / pTM read-outs of the pairwise head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.model.frames import gram_schmidt
from esm3_jax.model.layers import EMBED, LayerNorm, RegressionHead, fan_in_init, param

# Ideal N, CA, C in the residue's local frame (Å): CA at the origin, C on -x, N in the +y half.
IDEAL_BACKBONE_3x3 = np.array([[0.5256, 1.3612, 0.0], [0.0, 0.0, 0.0], [-1.5251, 0.0, 0.0]], np.float32)

N_DISTOGRAM_BINS = 64
N_DIRECTION_BINS = 16  # per each of the 6 direction dot products
N_PAE_BINS = 64
N_PLDDT_BINS = 50
MAX_PAE_BIN = 31.0  # Å
PAIRWISE_SPLITS = (N_DISTOGRAM_BINS, 6 * N_DIRECTION_BINS, N_PAE_BINS)
N_TORSIONS = 7


class FrameHead(nn.Module):
    """Translation and two vectors per residue -> Gram-Schmidt frame -> ideal backbone atoms.

    The 23 outputs are t (3), a (3), b (3) and 7 torsion (sin, cos) pairs; the frame's x-axis is
    -a, b lies in its xy-plane, and t is scaled by 10 so the network works in nanometre-ish units.
    """

    d_model: int
    trans_scale: float = 10.0

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> dict[str, jnp.ndarray]:
        out = RegressionHead(self.d_model, 9 + 2 * N_TORSIONS, out_axis=None, name="mlp")(x_BxLxD)
        out = out.astype(jnp.float32)
        t, a, b = out[..., 0:3] * self.trans_scale, out[..., 3:6], out[..., 6:9]
        a = a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-5)
        b = b / (jnp.linalg.norm(b, axis=-1, keepdims=True) + 1e-5)
        rot_BxLx3x3 = gram_schmidt(-a, b)
        backbone = jnp.einsum("blij,aj->blai", rot_BxLx3x3, jnp.asarray(IDEAL_BACKBONE_3x3)) + t[..., None, :]
        torsions = out[..., 9:].reshape(*out.shape[:-1], N_TORSIONS, 2)
        return {"rot": rot_BxLx3x3, "trans": t, "backbone": backbone, "torsions": torsions}


class PairwiseHead(nn.Module):
    """Pair logits from [q_j * k_i, q_j - k_i] through a small MLP, without biases.

    Logit (i, j) pairs residue i's k with residue j's q, the reference's orientation.
    """

    d_model: int
    d_pair: int = 128
    hidden: int = 128
    n_out: int = sum(PAIRWISE_SPLITS)

    @nn.compact
    def __call__(self, x_BxLxD: jnp.ndarray) -> jnp.ndarray:
        half = self.d_pair // 2
        w_down = param(self, "down", (self.d_model, self.d_pair), (EMBED, None), fan_in_init())
        qk = jnp.einsum("bld,dp->blp", x_BxLxD, w_down).astype(jnp.float32)
        q_BxLxP, k_BxLxP = qk[..., :half], qk[..., half:]
        w1 = param(self, "pair_in", (self.d_pair, self.hidden), (None, None), fan_in_init())
        # The difference half is linear, so its projection is done per residue (O(L)) and only
        # broadcast to pairs; only the product half needs the (L, L) features.
        w_prod, w_diff = w1[:half], w1[half:]
        prod_BxLxLxP = k_BxLxP[:, :, None, :] * q_BxLxP[:, None, :, :]
        h = (
            jnp.einsum("bijp,ph->bijh", prod_BxLxLxP, w_prod)
            + (q_BxLxP @ w_diff)[:, None, :, :]
            - (k_BxLxP @ w_diff)[:, :, None, :]
        )
        h = nn.gelu(h, approximate=False)
        h = LayerNorm((None,), name="norm")(h)
        w2 = param(self, "pair_out", (self.hidden, self.n_out), (None, None), fan_in_init())
        return jnp.einsum("bijh,ho->bijo", h, w2)


def pae_bin_centres(n_bins: int = N_PAE_BINS, max_bin: float = MAX_PAE_BIN) -> np.ndarray:
    """n_bins - 1 centres spread over [0, max_bin] shifted by half a step, plus one tail bin."""
    step = max_bin / (n_bins - 2)
    centres = np.linspace(0.0, max_bin, n_bins - 1, dtype=np.float32) + step / 2
    return np.concatenate([centres, centres[-1:] + step]).astype(np.float32)


def _pair_probs(logits_BxLxLxK: jnp.ndarray, mask_BxL: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    pair_BxLxL = mask_BxL[:, :, None] & mask_BxL[:, None, :]
    logits = jnp.where(pair_BxLxL[..., None], logits_BxLxLxK, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), pair_BxLxL


def predicted_aligned_error(logits_BxLxLxK: jnp.ndarray, mask_BxL: jnp.ndarray) -> jnp.ndarray:
    """Expected aligned error (Å) per pair; pairs involving a masked residue read as the uniform mean."""
    probs, _ = _pair_probs(logits_BxLxLxK, mask_BxL)
    return probs @ jnp.asarray(pae_bin_centres(logits_BxLxLxK.shape[-1]))


def predicted_tm(logits_BxLxLxK: jnp.ndarray, mask_BxL: jnp.ndarray) -> jnp.ndarray:
    """pTM (B,): max over aligned residues i of the mean over j of the expected TM term."""
    probs, pair_BxLxL = _pair_probs(logits_BxLxLxK, mask_BxL)
    n_B = jnp.sum(mask_BxL, axis=-1).astype(jnp.float32)
    d0_B = 1.24 * (jnp.maximum(n_B, 19.0) - 15.0) ** (1.0 / 3.0) - 1.8
    bins_K = jnp.asarray(pae_bin_centres(logits_BxLxLxK.shape[-1]))
    f_BxK = 1.0 / (1.0 + (bins_K[None, :] / d0_B[:, None]) ** 2)
    tm_BxLxL = jnp.einsum("bijk,bk->bij", probs, f_BxK)
    w = pair_BxLxL.astype(jnp.float32)
    per_i_BxL = jnp.sum(tm_BxLxL * w, axis=-1) / (jnp.sum(w, axis=-1) + 1e-10)
    return jnp.max(per_i_BxL, axis=-1)


def expected_plddt(logits_BxLxK: jnp.ndarray) -> jnp.ndarray:
    """Mean of the softmax over K uniform bins on [0, 1] (bin centres)."""
    k = logits_BxLxK.shape[-1]
    centres = (np.arange(k, dtype=np.float32) + 0.5) / k
    return jax.nn.softmax(logits_BxLxK.astype(jnp.float32), axis=-1) @ jnp.asarray(centres)
