"""The pairwise core of geometric attention as one fused kernel with a hand-written backward pass.

Given per-head query/key direction vectors, query/key points and values, already moved into the
global frame and scaled (softplus(w_rot)/sqrt3 folded into the query directions, softplus(w_dist)/
sqrt3 into both point sets, so that |a q - a k| = a |q - k| carries the distance weight):

    s_nqk = <qr_nq, kr_nk> - |qd_nq - kd_nk| + bias_nqk,    o_nq = sum_k softmax_k(s_nqk) v_nk

Written with jnp einsums and left to autodiff, XLA materialises about twenty (heads, L, L) tensors
in the forward and backward passes (broadcast distance terms, the bias per head, the softmax and
its gradient pieces), and the sublayer is memory-bound. Here the logits are recomputed elementwise
from the O(L) vectors wherever they are needed, and the backward pass is written out: one pass
over the (Q, K) grid yields the softmax gradient, and every input gradient is a contraction of it
with an O(L) vector. Only the softmax statistics per query are kept from the forward pass, as in
flash attention.

The contractions with the O(L) vectors are skinny matmuls with the grid untransposed: (Q, K) @
(K, c) over keys, (c, Q) @ (Q, K) over queries, with a ones column or row where a gradient also
needs the grid's row or column sums. Measured on the small shape (8 x 64 heads x 512 x 512,
fwd+bwd): 1.1 s with a second, transposed grid pass, 0.75-0.85 s with one pass (BENCHMARKS.md).
One matrix-vector product per coordinate was faster still for the kernel alone (0.74 against
0.86 s on one core), but the two-core train step was slower with it, in 6 of 8 alternating
rounds (presumably as Eigen splits a GEMM over both cores and XLA runs a matrix-vector loop on one).

Work is split over chunks of the flattened batch x head axis (`lax.map`), so only a few
(chunk, Q, K) blocks are alive at once: this bounds memory at long lengths and, with small blocks
on the CPU, keeps them in cache (a grid pass that writes its block to memory costs 3-4x one that
stays in cache). Every vector enters as three separate (N, len) coordinate planes, materialised
before the loop: a component sliced out of an (N, len, 3) array inside the loop's fusions turns
each element's load into index arithmetic that LLVM does not vectorise (measured on XLA:CPU: the
backward pass 4x slower).
The bias follows the reference exactly: +1 for same-sequence pairs (not a mask), the most negative
float where the key has no frame or the pair spans two chains.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)
# Inside the square root: keeps the distance's gradient finite when two points coincide.
_DIST_EPS = 1e-12
# Upper bound on one (chunk, Q, K) fp32 block; the backward pass holds about five of them.
# CPU: one row of a 512 x 512 grid, small enough to stay in the core's cache (the small config's
# sublayer: 2.4 s fwd+bwd unchunked, 0.47 s in 1 MiB blocks, 0.77 s in 4 MiB; BENCHMARKS.md).
# Elsewhere: large blocks, to give each kernel launch enough work; a bound on memory only.
CHUNK_BYTES = {"cpu": 1 << 20}
DEFAULT_CHUNK_BYTES = 1 << 30


def default_chunk_bytes(platform: str) -> int:
    """The block bound used when none is configured, for a platform name ("cpu", "gpu", "tpu")."""
    return CHUNK_BYTES.get(platform, DEFAULT_CHUNK_BYTES)


def _outer_dot(a, b):  # each three (N, len) planes
    """sum_c a[c][n, i] * b[c][n, j] elementwise (no dot: K=3 contractions are fused into the logits)."""
    return sum(a[c][:, :, None] * b[c][:, None, :] for c in range(3))


def _grid(rows, cols, key_is_col: bool):
    """Logits and distances on a (N, rows, cols) grid.

    rows/cols: dicts with vectors 'r' (directions) and 'd' (points) as three (N, len) planes, and per-residue
    'seq', 'chain' (N, len) and, for the key side, 'ok' (N, len). On the query grid the keys are
    the columns; on the transposed (key) grid they are the rows.
    """
    dirs = _outer_dot(rows["r"], cols["r"])
    sq = sum((rows["d"][c][:, :, None] - cols["d"][c][:, None, :]) ** 2 for c in range(3))
    dist = jnp.sqrt(sq + _DIST_EPS)
    same = rows["seq"][:, :, None] == cols["seq"][:, None, :]
    key_ok = cols["ok"][:, None, :] if key_is_col else rows["ok"][:, :, None]
    blocked = ~key_ok | (rows["chain"][:, :, None] != cols["chain"][:, None, :])
    bias = jnp.where(blocked, _NEG, same.astype(jnp.float32))
    return dirs - dist + bias, dist


def _sides(qr, kr, qd, kd, q_meta, k_meta):
    q = {"r": qr, "d": qd, "seq": q_meta[0], "chain": q_meta[1]}
    k = {"r": kr, "d": kd, "seq": k_meta[0], "chain": k_meta[1], "ok": k_meta[2]}
    return q, k


def _over_keys(grid_NxQxK, vectors):
    """[grid @ x for x in vectors], as one (Q, K) @ (K, c) matmul: each x (N, K), each result (N, Q)."""
    out_NxQxC = jnp.einsum("nqk,nkc->nqc", grid_NxQxK, jnp.stack(vectors, axis=-1))
    return [out_NxQxC[..., c] for c in range(len(vectors))]


def _over_queries(vectors, grid_NxQxK):
    """[x @ grid for x in vectors], as one (c, Q) @ (Q, K) matmul: each x (N, Q), each result (N, K)."""
    out_NxCxK = jnp.einsum("ncq,nqk->nck", jnp.stack(vectors, axis=1), grid_NxQxK)
    return [out_NxCxK[:, c] for c in range(len(vectors))]


def _forward_chunk(qr, kr, v, qd, kd, q_meta, k_meta):
    q, k = _sides(qr, kr, qd, kd, q_meta, k_meta)
    s_NxQxK, _ = _grid(q, k, key_is_col=True)
    m_NxQ = jnp.max(s_NxQxK, axis=-1)
    e_NxQxK = jnp.exp(s_NxQxK - m_NxQ[..., None])
    *acc, norm_NxQ = _over_keys(e_NxQxK, (*v, jnp.ones_like(v[0])))
    o_NxQx3 = jnp.stack(acc, axis=-1) / norm_NxQ[..., None]
    # Max and normaliser are kept apart, not as one log-sum-exp: in a row whose every key is
    # blocked, m is the most negative float and m + log(norm) would round back to m.
    return o_NxQx3, (m_NxQ, 1.0 / norm_NxQ)


def _backward_chunk(qr, kr, v, qd, kd, q_meta, k_meta, o_NxQx3, m_NxQ, inv_norm_NxQ, do_NxQx3, do):
    q, k = _sides(qr, kr, qd, kd, q_meta, k_meta)
    delta_NxQ = jnp.sum(do_NxQx3 * o_NxQx3, axis=-1)
    s, dist = _grid(q, k, key_is_col=True)
    p = jnp.exp(s - m_NxQ[:, :, None]) * inv_norm_NxQ[:, :, None]
    ds = p * (_outer_dot(do, v) - delta_NxQ[:, :, None])
    # d(-dist)/d(qd) = -(qd - kd)/dist and d(-dist)/d(kd) = (qd - kd)/dist: both go through g.
    g = ds / dist
    ones_q, ones_k = jnp.ones_like(qd[0]), jnp.ones_like(kd[0])
    # Queries' gradients: reductions over keys.
    d_qr = _over_keys(ds, kr)
    *g_kd, g_rows = _over_keys(g, (*kd, ones_k))
    d_qd = [g_kd[c] - g_rows * qd[c] for c in range(3)]
    # Keys' and values' gradients: reductions over queries, from the same grids.
    d_v = _over_queries(do, p)
    d_kr = _over_queries(qr, ds)
    *g_qd, g_cols = _over_queries((*qd, ones_q), g)
    d_kd = [g_qd[c] - g_cols * kd[c] for c in range(3)]
    return tuple(map(tuple, (d_qr, d_kr, d_v, d_qd, d_kd)))


def _chunk_size(n: int, q: int, k: int, chunk_bytes: int) -> int:
    """Largest divisor of n whose (chunk, q, k) fp32 array fits in chunk_bytes (at least 1)."""
    best = 1
    for c in range(1, n + 1):
        if n % c == 0 and c * q * k * 4 <= chunk_bytes:
            best = c
    return best


def _map_chunks(fn, n_chunks: int, *args):
    """Apply fn to consecutive chunks of the leading axis of every array in args; concatenate the results."""
    if n_chunks == 1:
        return fn(*args)
    split = lambda a: a.reshape((n_chunks, a.shape[0] // n_chunks) + a.shape[1:])
    out = jax.lax.map(lambda xs: fn(*xs), jax.tree.map(split, args))
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out)


def _planes(x_NxLx3):
    """The three (N, L) coordinate planes, each its own contiguous array (module docstring)."""
    return tuple(x_NxLx3[..., c] for c in range(3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(qr, kr, v, qd, kd, q_meta, k_meta, n_chunks):
    return _attend_fwd(qr, kr, v, qd, kd, q_meta, k_meta, n_chunks)[0]


def _attend_fwd(qr, kr, v, qd, kd, q_meta, k_meta, n_chunks):
    o, stats = _map_chunks(_forward_chunk, n_chunks, qr, kr, v, qd, kd, q_meta, k_meta)
    return o, (qr, kr, v, qd, kd, q_meta, k_meta, o, stats)


def _attend_bwd(n_chunks, res, do_NxQx3):
    qr, kr, v, qd, kd, q_meta, k_meta, o, (m, inv_norm) = res
    grads = _map_chunks(_backward_chunk, n_chunks, qr, kr, v, qd, kd, q_meta, k_meta, o, m, inv_norm, do_NxQx3, _planes(do_NxQx3))
    return (*grads, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def geometric_softmax(
    q_rot_NxQx3, k_rot_NxKx3, value_NxKx3, q_dist_NxQx3, k_dist_NxKx3,
    q_sequence_id_NxQ, k_sequence_id_NxK, q_chain_id_NxQ, k_chain_id_NxK, key_has_frame_NxK,
    chunk_bytes: int | None = None,
):
    """o (N, Q, 3) = softmax_k(<qr, kr> - |qd - kd| + bias) @ v, over N independent (batch, head) rows.

    All vector inputs fp32 in the global frame, scales already folded in (module docstring).
    chunk_bytes bounds one (rows, Q, K) fp32 block; None: `default_chunk_bytes` of the default backend.
    """
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(jax.default_backend())
    planes = lambda a: _planes(jnp.asarray(a, jnp.float32))
    n, q, k = q_rot_NxQx3.shape[0], q_rot_NxQx3.shape[1], k_rot_NxKx3.shape[1]
    n_chunks = n // _chunk_size(n, q, k, chunk_bytes)
    return _attend(
        planes(q_rot_NxQx3), planes(k_rot_NxKx3), planes(value_NxKx3), planes(q_dist_NxQx3), planes(k_dist_NxKx3),
        (q_sequence_id_NxQ, q_chain_id_NxQ), (k_sequence_id_NxK, k_chain_id_NxK, key_has_frame_NxK), n_chunks,
    )
