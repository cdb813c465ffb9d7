"""SE(3)-invariant geometric attention (ESM3_SPEC section 3.2), computed in fp32.

Each residue projects, per head, three rotation vectors (query and key direction, value) and two
points (query and key for the distance term) in its own frame; moving them to the global frame
before they interact is what makes the logits invariant to rotating and translating the protein:

    logit_hij = softplus(w_rot_h) <qr_hi, kr_hj>/sqrt3 - softplus(w_dist_h) |qd_hi - kd_hj|/sqrt3 + bias_ij

The bias reproduces the reference exactly: +1 for same-sequence pairs (not a mask), and the most
negative float where the key has no frame or the two residues are on different chains.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from esm3_jax.model.geom_kernel import geometric_softmax
from esm3_jax.model.layers import EMBED, LayerNorm, dense, fan_in_init, param

_INV_SQRT3 = 1.0 / math.sqrt(3.0)
# Projection groups, in the reference's channel order.
Q_ROT, K_ROT, VALUE, Q_DIST, K_DIST = range(5)


class GeometricAttention(nn.Module):
    d_model: int
    v_heads: int
    use_bias: bool = False
    mask_and_zero_frameless: bool = True
    chunk_bytes: int | None = None  # the kernel's block bound; None: its default for the backend

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jnp.ndarray,
        rot_BxLx3x3: jnp.ndarray,
        trans_BxLx3: jnp.ndarray,
        frame_mask_BxL: jnp.ndarray,
        sequence_id_BxL: jnp.ndarray,
        chain_id_BxL: jnp.ndarray,
        n_queries: int | None = None,
    ) -> jnp.ndarray:
        """(B, L, D) updates; with `n_queries`, only the first n_queries residues attend (all L
        still serve as keys) and the output is (B, n_queries, D). The VQ-VAE encoder's last block
        needs only the query residue's row, so it skips the other queries' work this way."""
        h = self.v_heads
        out_dtype = x_BxLxD.dtype
        y = LayerNorm(use_bias=self.use_bias, dtype=jnp.float32, name="norm")(x_BxLxD)
        w_proj = param(self, "proj", (self.d_model, 5, h, 3), (EMBED, None, "geom_heads", None), fan_in_init())
        b_proj = (
            param(self, "proj_bias", (5, h, 3), (None, "geom_heads", None), nn.initializers.zeros)
            if self.use_bias else None
        )
        # Centre translations on each row's mean: distances are translation invariant, and small
        # magnitudes keep the points' fp32 rounding small next to their separations.
        trans = trans_BxLx3 - jax.lax.stop_gradient(jnp.mean(trans_BxLx3, axis=1, keepdims=True))
        to_bhl = lambda a: jnp.transpose(a, (0, 2, 1, 3))  # (B,L,H,3) -> (B,H,L,3)
        if n_queries is None:
            p_BxLx5xHx3 = dense(y, w_proj)
            if b_proj is not None:
                p_BxLx5xHx3 = p_BxLx5xHx3 + b_proj
            # Local -> global: v_global = R v_local (+ t for points).
            g_BxLx5xHx3 = jnp.einsum("blij,blghj->blghi", rot_BxLx3x3, p_BxLx5xHx3)
            q_rot, k_rot, value = (to_bhl(g_BxLx5xHx3[:, :, i]) for i in (Q_ROT, K_ROT, VALUE))
            q_dist = to_bhl(g_BxLx5xHx3[:, :, Q_DIST] + trans[:, :, None])
            k_dist = to_bhl(g_BxLx5xHx3[:, :, K_DIST] + trans[:, :, None])
        else:
            def project(y_BxNxD, groups, rot_BxNx3x3):
                groups = jnp.asarray(groups)
                p = dense(y_BxNxD, w_proj[:, groups])
                if b_proj is not None:
                    p = p + b_proj[groups]
                return jnp.einsum("blij,blghj->blghi", rot_BxNx3x3, p)

            nq = n_queries
            gq = project(y[:, :nq], (Q_ROT, Q_DIST), rot_BxLx3x3[:, :nq])
            gk = project(y, (K_ROT, VALUE, K_DIST), rot_BxLx3x3)
            q_rot, k_rot, value = to_bhl(gq[:, :, 0]), to_bhl(gk[:, :, 0]), to_bhl(gk[:, :, 1])
            q_dist = to_bhl(gq[:, :, 1] + trans[:, :nq, None])
            k_dist = to_bhl(gk[:, :, 2] + trans[:, :, None])
            rot_BxLx3x3 = rot_BxLx3x3[:, :nq]  # for the way back into the queries' frames

        w_rot = nn.softplus(param(self, "rotation_scale", (h,), ("geom_heads",), nn.initializers.zeros))
        w_dist = nn.softplus(param(self, "distance_scale", (h,), ("geom_heads",), nn.initializers.zeros))
        # Fold the per-head weights into the vectors (a|q - k| = |aq - ak| for a > 0), flatten
        # (batch, head) into the kernel's rows, and let the fused kernel do the pairwise part.
        B, nq = q_rot.shape[0], q_rot.shape[2]
        rows = lambda a_BxHxNx3: a_BxHxNx3.reshape(B * h, a_BxHxNx3.shape[2], 3)
        per_head = lambda a: a[None, :, None, None]
        per_row = lambda a_BxN: jnp.repeat(a_BxN, h, axis=0)
        o_NxQx3 = geometric_softmax(
            rows(q_rot * per_head(w_rot * _INV_SQRT3)), rows(k_rot), rows(value),
            rows(q_dist * per_head(w_dist * _INV_SQRT3)), rows(k_dist * per_head(w_dist * _INV_SQRT3)),
            per_row(sequence_id_BxL[:, :nq]), per_row(sequence_id_BxL), per_row(chain_id_BxL[:, :nq]),
            per_row(chain_id_BxL), per_row(frame_mask_BxL), chunk_bytes=self.chunk_bytes,
        )
        o_BxHxLx3 = o_NxQx3.reshape(B, h, nq, 3)

        # Global -> the query's local frame: R^T o.
        o_BxLxHx3 = jnp.einsum("blji,bhlj->blhi", rot_BxLx3x3, o_BxHxLx3)
        if self.mask_and_zero_frameless:
            o_BxLxHx3 = jnp.where(frame_mask_BxL[:, :nq, None, None], o_BxLxHx3, 0.0)
        w_out = param(self, "out", (h, 3, self.d_model), ("geom_heads", None, EMBED), fan_in_init(2))
        out = dense(o_BxLxHx3, w_out, n_in=2)
        if self.use_bias:
            out = out + param(self, "out_bias", (self.d_model,), (EMBED,), nn.initializers.zeros)
        return out.astype(out_dtype)
