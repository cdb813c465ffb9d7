"""The VQ-VAE codebook (ESM3_SPEC 5.2): nearest-code quantisation trained by exponential moving
averages, not by gradients.

The codes and their EMA statistics live in the flax variable collection "codebook", never in
"params", so the optimiser cannot touch them. Apply with `mutable=["codebook"]` and
`update=True` to take one EMA step; with `update=False` the codebook is read-only (inference).

    cluster_size_c <- decay * cluster_size_c + (1 - decay) * #{z assigned to c}
    embed_sum_c    <- decay * embed_sum_c    + (1 - decay) * sum of the z assigned to c
    code_c         =  embed_sum_c / cluster_size_c   (cluster sizes Laplace-smoothed)

A code whose EMA cluster size falls below `restart_threshold` is dead: it is restarted at a random
encoder output of the current batch (the paper's fix for codebook collapse; the released code
stops at `assert False`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

COLLECTION = "codebook"


def nearest_code(z_NxC: jnp.ndarray, codes_KxC: jnp.ndarray) -> jnp.ndarray:
    """Index of the nearest code (L2) for each row; ties go to the lower index, as torch.argmin."""
    # |z|^2 is constant per row, so argmin |z - e|^2 = argmin (|e|^2 - 2 z.e); keeping the |z|^2
    # term anyway matches the reference's float rounding, which decides near-ties the same way.
    d_NxK = (
        jnp.sum(z_NxC**2, axis=1, keepdims=True)
        - 2.0 * z_NxC @ codes_KxC.T
        + jnp.sum(codes_KxC**2, axis=1)[None, :]
    )
    return jnp.argmin(d_NxK, axis=1).astype(jnp.int32)


def usage_metrics(indices_N: jnp.ndarray, mask_N: jnp.ndarray, n_codes: int) -> dict[str, jnp.ndarray]:
    """Fraction of codes used by the valid rows, and the perplexity of their code distribution."""
    counts_K = jnp.zeros((n_codes,), jnp.float32).at[indices_N].add(mask_N.astype(jnp.float32))
    p_K = counts_K / jnp.maximum(jnp.sum(counts_K), 1.0)
    entropy = -jnp.sum(jnp.where(p_K > 0, p_K * jnp.log(jnp.where(p_K > 0, p_K, 1.0)), 0.0))
    return {"codebook_usage": jnp.mean(counts_K > 0), "codebook_perplexity": jnp.exp(entropy)}


def initial_codes(z_NxC: jnp.ndarray, mask_N: jnp.ndarray, n_codes: int, rng: jax.Array) -> jnp.ndarray:
    """Codes drawn from valid encoder outputs (the reference's data-dependent init).

    Sampling with replacement plus noise of std 0.01/sqrt(C) is what the reference's tiling does
    when the batch holds fewer vectors than codes: duplicates start apart and can drift apart.
    """
    k_pick, k_noise = jax.random.split(rng)
    p_N = mask_N.astype(jnp.float32) / jnp.maximum(jnp.sum(mask_N), 1)
    rows = jax.random.choice(k_pick, z_NxC.shape[0], (n_codes,), p=p_N)
    noise = jax.random.normal(k_noise, (n_codes, z_NxC.shape[1])) * (0.01 / jnp.sqrt(z_NxC.shape[1]))
    return z_NxC[rows] + noise


class EMACodebook(nn.Module):
    n_codes: int
    dim: int
    decay: float = 0.99
    restart_threshold: float = 1.0
    commitment_weight: float = 0.25

    @nn.compact
    def __call__(self, z_BxLxC: jnp.ndarray, mask_BxL: jnp.ndarray, update: bool = False):
        """Returns (straight-through quantised z, code indices (B, L), commitment loss, metrics).

        `mask` marks the rows that count: padding and frameless residues neither move the codes
        nor enter the loss. The commitment loss is the reference's 0.25 * MSE(z, sg[e]).
        """
        init_codes = lambda: jax.random.normal(self.make_rng("params"), (self.n_codes, self.dim))
        codes = self.variable(COLLECTION, "embeddings", init_codes)
        cluster_size = self.variable(COLLECTION, "cluster_size", lambda: jnp.ones((self.n_codes,), jnp.float32))
        embed_sum = self.variable(COLLECTION, "embed_sum", lambda: codes.value)

        B, L, C = z_BxLxC.shape
        z_NxC = z_BxLxC.reshape(B * L, C).astype(jnp.float32)
        mask_N = mask_BxL.reshape(B * L)
        idx_N = nearest_code(jax.lax.stop_gradient(z_NxC), codes.value)
        e_NxC = codes.value[idx_N]

        w_N = mask_N.astype(jnp.float32)
        n_valid = jnp.maximum(jnp.sum(w_N), 1.0)
        sq_N = jnp.mean((z_NxC - jax.lax.stop_gradient(e_NxC)) ** 2, axis=1)
        commitment = self.commitment_weight * jnp.sum(sq_N * w_N) / n_valid
        e_st_NxC = z_NxC + jax.lax.stop_gradient(e_NxC - z_NxC)  # straight-through estimator
        metrics = usage_metrics(idx_N, mask_N, self.n_codes)

        # Share of codes below the restart threshold: with an update, those it just restarted.
        if update and not self.is_initializing():
            dead_K = self._ema_step(jax.lax.stop_gradient(z_NxC), idx_N, w_N, codes, cluster_size, embed_sum)
        else:
            dead_K = cluster_size.value < self.restart_threshold
        metrics["codebook_dead_codes"] = jnp.mean(dead_K)
        return e_st_NxC.reshape(B, L, C), idx_N.reshape(B, L), commitment, metrics

    def _ema_step(self, z_NxC, idx_N, w_N, codes, cluster_size, embed_sum):
        onehot_NxK = jax.nn.one_hot(idx_N, self.n_codes, dtype=jnp.float32) * w_N[:, None]
        d = self.decay
        size_K = d * cluster_size.value + (1 - d) * jnp.sum(onehot_NxK, axis=0)
        sum_KxC = d * embed_sum.value + (1 - d) * (onehot_NxK.T @ z_NxC)
        # Laplace smoothing keeps a never-used code's division finite.
        total = jnp.sum(size_K)
        smoothed_K = (size_K + 1e-5) / (total + self.n_codes * 1e-5) * total
        new_codes = sum_KxC / smoothed_K[:, None]

        # Restart dead codes at random valid encoder outputs of this batch, and reset their
        # statistics to that one sample so the next EMA step does not pull them back.
        dead_K = size_K < self.restart_threshold
        fresh_KxC = initial_codes(z_NxC, w_N > 0, self.n_codes, self.make_rng(COLLECTION))
        codes.value = jnp.where(dead_K[:, None], fresh_KxC, new_codes)
        embed_sum.value = jnp.where(dead_K[:, None], fresh_KxC, sum_KxC)
        cluster_size.value = jnp.where(dead_K, 1.0, size_K)
        return dead_K

    def lookup(self, indices: jnp.ndarray) -> jnp.ndarray:
        return self.get_variable(COLLECTION, "embeddings")[indices]
