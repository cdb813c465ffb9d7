"""Training-path parity: gradients of every ESM3 parameter against the reference's torch autograd.

The forward parity tests (test_model_parity.py) do not reach the backward pass, which here is
partly written by hand (the fused geometric-attention kernel, model/geom_kernel.py). A fixed
random linear read-out of every output makes a scalar loss that depends on every logit, so every
parameter's gradient is compared, on inputs that exercise the geometric sublayer's masks: packed
sequences, two chains, and missing coordinates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.compat.esm3_weights import infer_esm3_config, torch_to_esm3_params
from esm3_jax.model.esm3 import ESM3
from tests.reference import build_reference_esm3, import_reference, relative_error
from tests.test_model_parity import _backbone, _sequence

D, H, VH, NL = 64, 4, 8, 3
OUTPUTS = ("sequence_logits", "structure_logits", "secondary_structure_logits", "sasa_logits",
           "function_logits", "residue_logits", "embeddings")
TOL = 2e-4  # fp32 reductions in a different order; the forward pass agrees to ~1e-6


def _inputs(rng, B, L):
    seq = _sequence(rng, B, L)
    sequence_id = np.zeros((B, L), np.int32)
    sequence_id[:, L // 2:] = 1  # two packed sequences per row
    chain_id = np.zeros((B, L), np.int32)
    chain_id[:, 3 * L // 4:] = 1  # and a second chain in the second one
    coords = _backbone(rng, B, L)
    coords[0, 4:7] = np.nan  # frameless residues: masked as keys, zeroed as queries
    coords[1, :, 1] += 50.0 * (np.arange(L) >= L // 2)[:, None]  # far-apart sequences
    return dict(sequence_tokens=seq, structure_coords=coords, sequence_id=sequence_id, chain_id=chain_id,
                structure_tokens=rng.integers(0, 4096, size=(B, L)).astype(np.int32))


def _readout_weights(rng, shapes):
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def test_parameter_gradients_match_the_reference():
    torch, reference = import_reference()
    model, state = build_reference_esm3(D, H, VH, NL, seed=3)
    rng = np.random.default_rng(7)
    B, L = 2, 20
    inputs = _inputs(rng, B, L)

    model.train(False)
    out = model(**reference.to_torch_inputs(inputs))
    weights = _readout_weights(rng, {k: tuple(getattr(out, k).shape) for k in OUTPUTS})
    torch_loss = sum((getattr(out, k) * torch.from_numpy(weights[k])).sum() for k in OUTPUTS)
    model.zero_grad()
    torch_loss.backward()
    torch_grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters() if p.grad is not None}

    cfg = infer_esm3_config(state, H)
    params = torch_to_esm3_params(state, cfg)
    x = {k: jnp.asarray(v) for k, v in inputs.items()}

    def loss(p):
        o = ESM3(cfg).apply({"params": p}, **x)
        return sum(jnp.sum(o[k] * weights[k]) for k in OUTPUTS)

    jax_loss, jax_grads = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(jax_loss) - float(torch_loss)) <= 1e-4 * abs(float(torch_loss))

    # The weight conversion is linear (reshapes and transposes), so it maps gradients too.
    full_state = dict(state)
    full_state.update(torch_grads)
    expected = torch_to_esm3_params(full_state, cfg)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    checked = 0
    for path, g in jax.tree_util.tree_flatten_with_path(jax_grads)[0]:
        name = jax.tree_util.keystr(path)
        want = np.asarray(flat_expected[path])
        if not np.any(want) and not np.any(np.asarray(g)):
            continue  # e.g. unused embedding rows: zero on both sides
        err = relative_error(np.asarray(g), want)
        assert err <= TOL, f"{name}: gradient relative error {err:.2e} > {TOL}"
        checked += 1
    geom = [k for k in torch_grads if "geom_attn" in k]
    assert geom and checked >= len(torch_grads) // 2, (checked, len(torch_grads))


@pytest.mark.parametrize("n_queries", [None, 1])
def test_geometric_kernel_matches_autodiff_of_the_plain_formula(n_queries):
    """The hand-written backward pass against autodiff of the textbook expression, with chunking."""
    from esm3_jax.model.geom_kernel import geometric_softmax

    rng = np.random.default_rng(0)
    N, Q, K = 6, (n_queries or 16), 16
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    qr, kr, v, qd, kd = f(N, Q, 3), f(N, K, 3), f(N, K, 3), 3 * f(N, Q, 3), 3 * f(N, K, 3)
    seq = jnp.asarray((np.arange(K)[None] >= K // 2).repeat(N, 0).astype(np.int32))
    chain = jnp.asarray((np.arange(K)[None] >= 3 * K // 4).repeat(N, 0).astype(np.int32))
    ok = jnp.asarray(rng.random((N, K)) > 0.2)
    ok = ok.at[0].set(False)  # a row whose every key is blocked: uniform attention, as the reference
    w = f(N, Q, 3)

    def plain(qr, kr, v, qd, kd):
        dirs = jnp.einsum("nqc,nkc->nqk", qr, kr)
        dist = jnp.sqrt(jnp.sum((qd[:, :, None] - kd[:, None]) ** 2, -1))
        bias = (seq[:, :Q, None] == seq[:, None, :]).astype(jnp.float32)
        blocked = ~ok[:, None, :] | (chain[:, :Q, None] != chain[:, None, :])
        bias = jnp.where(blocked, jnp.finfo(jnp.float32).min, bias)
        return jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(dirs - dist + bias, -1), v)

    def fused(chunk_bytes):
        return lambda qr, kr, v, qd, kd: geometric_softmax(
            qr, kr, v, qd, kd, seq[:, :Q], seq, chain[:, :Q], chain, ok, chunk_bytes=chunk_bytes)

    args = (qr, kr, v, qd, kd)
    grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=tuple(range(5))))(*args)
    want_val, want = grad(plain)
    for chunk_bytes in (None, 1 << 30, 2 * Q * K * 4):  # the default, unchunked, and 3 chunks of 2 rows
        val, got = grad(fused(chunk_bytes))
        assert abs(float(val) - float(want_val)) <= 1e-5 * abs(float(want_val))
        for name, a, b in zip(("q_rot", "k_rot", "value", "q_dist", "k_dist"), got, want):
            assert relative_error(a, b) <= 1e-5, (name, chunk_bytes, relative_error(a, b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_backward_matches_autodiff(dtype):
    """layers.swiglu's hand-written backward against autodiff of silu(gate) * up, in fp32."""
    from esm3_jax.model.layers import swiglu

    rng = np.random.default_rng(0)
    gate, up, w = (jnp.asarray(rng.normal(size=(4, 32)).astype(np.float32) * 3) for _ in range(3))
    loss = lambda fn: lambda g, u: jnp.sum(fn(g, u).astype(jnp.float32) * w)
    want = jax.grad(loss(lambda g, u: jax.nn.silu(g) * u), argnums=(0, 1))(gate, up)
    got = jax.grad(loss(swiglu), argnums=(0, 1))(gate.astype(dtype), up.astype(dtype))
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert relative_error(a.astype(jnp.float32), b) <= tol
