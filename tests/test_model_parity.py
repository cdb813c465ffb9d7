"""ESM3 forward parity with the reference PyTorch implementation (same random weights, fp32)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.compat.esm3_weights import esm3_params_to_torch, infer_esm3_config, torch_to_esm3_params
from esm3_jax.model.esm3 import ESM3
from tests.reference import build_reference_esm3, relative_error, run_reference
from tests.paths import CONFIGS, DATA

TOL = 1e-4
D, H, VH, NL = 64, 4, 8, 3


@pytest.fixture(scope="module")
def reference():
    return build_reference_esm3(D, H, VH, NL, seed=0)


def _jax_forward(state, inputs, scan_layers=True):
    cfg = infer_esm3_config(state, H, scan_layers=scan_layers)
    params = torch_to_esm3_params(state, cfg)
    fn = jax.jit(lambda p, x: ESM3(cfg).apply({"params": p}, **x))
    out = fn(params, {k: (None if v is None else jnp.asarray(v)) for k, v in inputs.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def _compare(reference, inputs, scan_layers=True):
    model, state = reference
    ref = run_reference(model, inputs)
    got = _jax_forward(state, inputs, scan_layers)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert np.all(np.isfinite(got[k])), f"{k} has non-finite values"
        err = relative_error(got[k], ref[k])
        assert err <= TOL, f"{k}: relative error {err:.2e} > {TOL}"


def _rng(seed=1):
    return np.random.default_rng(seed)


def _backbone(rng, B, L):
    """A random-walk chain of backbone atoms at realistic spacing (3.8 Å CA-CA), in Å."""
    ca = np.cumsum(rng.normal(size=(B, L, 3)) * 2.2, axis=1) + rng.normal(size=(B, 1, 3)) * 30
    n = ca + rng.normal(size=(B, L, 3)) * 0.8 + np.array([0.5, 1.3, 0.0])
    c = ca + rng.normal(size=(B, L, 3)) * 0.8 - np.array([1.5, 0.0, 0.0])
    return np.stack([n, ca, c], axis=2).astype(np.float32)


def _sequence(rng, B, L):
    seq = rng.integers(4, 24, size=(B, L)).astype(np.int32)
    seq[:, 0], seq[:, -1] = T.SEQUENCE_BOS, T.SEQUENCE_EOS
    return seq


def test_sequence_structure_tokens_and_coordinates(reference):
    rng = _rng(1)
    B, L = 2, 24
    coords = _backbone(rng, B, L)
    coords[:, [0, -1]] = np.nan  # BOS/EOS carry no coordinates
    _compare(reference, dict(
        sequence_tokens=_sequence(rng, B, L),
        structure_tokens=rng.integers(0, 4096, size=(B, L)).astype(np.int32),
        structure_coords=coords,
    ))


def test_every_track_filled(reference):
    rng = _rng(2)
    B, L = 2, 20
    ra = rng.integers(0, T.RESIDUE_VOCAB_SIZE, size=(B, L, 16)).astype(np.int32)
    ra[rng.random((B, L, 16)) < 0.6] = 0  # mostly padded id lists, as real annotations are
    inputs = dict(
        sequence_tokens=_sequence(rng, B, L),
        structure_tokens=rng.integers(0, 4096, size=(B, L)).astype(np.int32),
        ss8_tokens=rng.integers(0, T.SS8_VOCAB_SIZE, size=(B, L)).astype(np.int32),
        sasa_tokens=rng.integers(0, T.SASA_VOCAB_SIZE, size=(B, L)).astype(np.int32),
        function_tokens=rng.integers(0, T.FUNCTION_VOCAB_SIZE, size=(B, L, 8)).astype(np.int32),
        residue_annotation_tokens=ra,
        average_plddt=np.repeat(rng.random((B, 1)), L, axis=1).astype(np.float32),
        per_res_plddt=rng.random((B, L)).astype(np.float32),
        structure_coords=_backbone(rng, B, L),
        chain_id=np.repeat((np.arange(L) >= L // 2)[None], B, axis=0).astype(np.int32),
    )
    _compare(reference, inputs)
    _compare(reference, inputs, scan_layers=False)


def test_packed_rows_with_sequence_id(reference):
    rng = _rng(3)
    B, L = 2, 30
    seq = _sequence(rng, B, L)
    sequence_id = np.zeros((B, L), np.int32)
    sequence_id[:, 12:] = 1
    sequence_id[1, 22:] = 2
    for start in (12, 22):
        seq[:, start - 1], seq[:, start] = T.SEQUENCE_EOS, T.SEQUENCE_BOS
    _compare(reference, dict(
        sequence_tokens=seq, structure_coords=_backbone(rng, B, L), sequence_id=sequence_id,
        chain_id=sequence_id.copy(),
    ))


def test_missing_coordinates_and_nan(reference):
    rng = _rng(4)
    B, L = 3, 18
    coords = _backbone(rng, B, L)
    coords[0, 3:7] = np.nan  # a gap
    coords[1, 5, 2] = np.nan  # one missing atom invalidates the residue
    coords[2] = np.nan  # a protein with no coordinates at all
    _compare(reference, dict(sequence_tokens=_sequence(rng, B, L), structure_coords=coords))
    got = _jax_forward(reference[1], dict(sequence_tokens=_sequence(rng, B, L), structure_coords=coords))
    assert all(np.all(np.isfinite(v)) for v in got.values())


def test_padded_batch_of_different_lengths(reference):
    rng = _rng(5)
    lengths, L = (26, 17, 9), 26
    seq = np.full((3, L), T.SEQUENCE_PAD, np.int32)
    coords = np.full((3, L, 3, 3), np.nan, np.float32)
    for i, n in enumerate(lengths):
        seq[i, :n] = _sequence(rng, 1, n)[0]
        coords[i, 1 : n - 1] = _backbone(rng, 1, n - 2)[0]
    # The reference's batched path passes a boolean "is real token" array as sequence_id.
    sequence_id = seq != T.SEQUENCE_PAD
    _compare(reference, dict(sequence_tokens=seq, structure_coords=coords, sequence_id=sequence_id))


def test_real_protein_structure(reference):
    path = DATA / "structures" / "biopython_tests" / "1A8O.cif.gz"
    if not path.is_file():
        pytest.skip(f"real structure not found at {path}")
    from esm3_jax.structure.io import load_structure

    chain = load_structure(path)[0]
    seq, coords37 = chain.sequence[:64], chain.coords[:64]
    tokens = T.encode_sequence(seq)[None]
    coords = np.full((1, len(seq) + 2, 3, 3), np.nan, np.float32)
    coords[0, 1:-1] = coords37[:, :3]  # atom37 starts with N, CA, C
    _compare(reference, dict(sequence_tokens=tokens, structure_coords=coords))


def test_state_dict_round_trip_loads_strictly_into_reference(reference):
    import torch

    model, state = reference
    cfg = infer_esm3_config(state, H)
    back = esm3_params_to_torch(torch_to_esm3_params(state, cfg), cfg)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k], err_msg=k)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_open_model_shape_parameter_count():
    from esm3_jax.train.config import load_config

    cfg = load_config(CONFIGS / "esm3_open_1.4b.yaml").model
    assert cfg.param_count() == 1_401_735_748
    abstract = jax.eval_shape(
        lambda: ESM3(cfg).init(jax.random.key(0), sequence_tokens=jnp.zeros((1, 4), jnp.int32))
    )
    import flax.linen as nn

    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract)))
    assert n == 1_401_735_748


def test_bfloat16_compute_stays_close_to_float32(reference):
    """bf16 matmuls with fp32 params, geometry and softmax: finite, and close to the fp32 result."""
    rng = _rng(6)
    B, L = 2, 24
    inputs = dict(sequence_tokens=_sequence(rng, B, L), structure_coords=_backbone(rng, B, L))
    state = reference[1]
    outs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = infer_esm3_config(state, H, compute_dtype=dtype)
        params = torch_to_esm3_params(state, cfg)
        outs[dtype] = jax.jit(lambda p, x: ESM3(cfg).apply({"params": p}, **x))(
            params, {k: jnp.asarray(v) for k, v in inputs.items()})
    for k, v in outs["bfloat16"].items():
        assert v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v))), k
        assert relative_error(np.asarray(v), np.asarray(outs["float32"][k])) < 5e-2, k


def test_every_parameter_carries_logical_axis_names():
    import flax.linen as nn

    from esm3_jax.train.config import load_config

    cfg = load_config(CONFIGS / "tiny.yaml").model
    boxed = jax.eval_shape(lambda: ESM3(cfg).init(jax.random.key(0), sequence_tokens=jnp.zeros((1, 4), jnp.int32)))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for x in leaves:
        assert len(x.names) == len(x.value.shape)
    names = {n for x in leaves for n in x.names if n}
    assert {"embed", "mlp", "heads", "kv", "vocab", "input_vocab", "layers", "geom_heads"} <= names


def test_scanned_trunk_program_size_is_independent_of_depth():
    """nn.scan keeps one copy of the block in the program, so 216 layers compile like 8."""
    from esm3_jax.train.config import load_config

    sizes = {}
    for n_layers in (8, 216):
        cfg = load_config(None, [f"model.n_layers={n_layers}", "model.d_model=32", "model.n_heads=2",
                                 "model.v_heads=4", "model.remat=full"]).model
        tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
        params = jax.eval_shape(lambda: ESM3(cfg).init(jax.random.key(0), sequence_tokens=jnp.zeros((1, 16), jnp.int32)))
        lowered = jax.jit(lambda p, t: ESM3(cfg).apply(p, sequence_tokens=t)).lower(params, tokens)
        text = lowered.as_text()
        assert "while" in text
        sizes[n_layers] = len(text)
    assert abs(sizes[216] - sizes[8]) / sizes[8] < 0.02, sizes
