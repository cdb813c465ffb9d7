"""`esm3-jax convert` and `esm3-jax forward` end to end, and their handling of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from esm3_jax.config import ConfigError
from esm3_jax.train.config import load_config
from esm3_jax.inference.forward import InputError, validate_inputs
from tests.reference import build_reference_esm3, import_reference, relative_error, run_reference


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch, _ = import_reference()
    model, state = build_reference_esm3(32, 2, 4, 2, seed=3)
    tmp = tmp_path_factory.mktemp("convert")
    pth = tmp / "esm3_small.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, pth)
    assert main(["convert", "--torch-state-dict", str(pth), "--n-heads", "2", "--out", str(tmp / "ckpt")]) == 0
    return model, state, tmp


def test_forward_cli_matches_reference_on_real_sequences(converted, capsys):
    model, _, tmp = converted
    # Three real sequences of different lengths, padded into one batch.
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMLEDPVDAFQLL|ARNDC", "MVLSPADKTNVKAAW"]
    L = max(len(s) for s in seqs) + 2
    tokens = np.full((len(seqs), L), T.SEQUENCE_PAD, np.int32)
    for i, s in enumerate(seqs):
        enc = T.encode_sequence(s)
        tokens[i, : len(enc)] = enc
    inputs = dict(sequence_tokens=tokens, sequence_id=(tokens != T.SEQUENCE_PAD).astype(np.int32))
    np.savez(tmp / "in.npz", **inputs)
    assert main(["forward", "--checkpoint", str(tmp / "ckpt"), "--inputs", str(tmp / "in.npz"),
                 "--out", str(tmp / "out.npz"), "--batch-size", "2"]) == 0
    assert "forward: 3 x" in capsys.readouterr().out
    got = dict(np.load(tmp / "out.npz"))
    ref = run_reference(model, dict(sequence_tokens=tokens, sequence_id=tokens != T.SEQUENCE_PAD))
    for k in ref:
        assert relative_error(got[k], ref[k]) <= 1e-4, k


def test_export_round_trip_is_bit_exact(converted):
    torch, _ = import_reference()
    model, state, tmp = converted
    out = tmp / "exported.pth"
    assert main(["convert", "--export", str(tmp / "ckpt"), "--out", str(out)]) == 0
    back = torch.load(out, weights_only=True)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
    model.load_state_dict(back, strict=True)


def test_convert_errors_are_one_line(tmp_path, capsys):
    torch, _ = import_reference()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a state dict")
    assert main(["convert", "--torch-state-dict", str(bad), "--n-heads", "2", "--out", str(tmp_path / "o")]) == 2
    assert "bad.pth: not a readable PyTorch state dict" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(2, 2)}, wrong)
    assert main(["convert", "--torch-state-dict", str(wrong), "--n-heads", "2", "--out", str(tmp_path / "o")]) == 2
    assert "not an ESM3 state dict" in capsys.readouterr().err
    assert main(["forward", "--checkpoint", str(tmp_path), "--inputs", str(wrong), "--out", "x.npz"]) == 2
    err = capsys.readouterr().err
    assert "wrong.pth" in err and "esm3-jax forward: error" in err


def test_forward_reports_a_missing_checkpoint(tmp_path, capsys):
    np.savez(tmp_path / "in.npz", sequence_tokens=np.zeros((1, 4), np.int32))
    rc = main(["forward", "--checkpoint", str(tmp_path / "nope"), "--inputs", str(tmp_path / "in.npz"),
               "--out", str(tmp_path / "o.npz")])
    assert rc == 2
    assert "not an esm3-jax checkpoint" in capsys.readouterr().err


def test_invalid_residue_letter_names_letter_and_position():
    with pytest.raises(ValueError, match=r"'J'.*position 3"):
        T.encode_sequence("MKJL")


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(sequence_tokens=np.zeros((2, 5), np.int32), ss8_tokens=np.zeros((2, 6), np.int32)),
         r"track length mismatch: 'ss8_tokens' is \(2, 6\)"),
        (dict(sequence_tokens=np.full((1, 4), 70, np.int32)), r"'sequence_tokens' id 70 at index \(0, 0\) is outside \[0, 32\]"),
        (dict(structure_tokens=np.full((1, 4), 5000, np.int32)), r"'structure_tokens' id 5000"),
        (dict(function_tokens=np.zeros((1, 4, 7), np.int32)), r"'function_tokens' has shape \(1, 4, 7\), expected \(B, L, 8\)"),
        (dict(residue_annotation_tokens=np.full((1, 4, 16), 1478, np.int32)), r"id 1478 .* outside \[0, 1477\]"),
        (dict(sequence_tokens=np.zeros((1, 4), np.float32)), r"must hold integer ids"),
        (dict(sequence_tokens=np.zeros((1, 4), np.int32), per_res_plddt=np.full((1, 4), np.nan)), r"non-finite value"),
        (dict(sequence_tokens=np.zeros((1, 4), np.int32), seq_tokens=np.zeros((1, 4), np.int32)), r"unknown input"),
        (dict(chain_id=np.zeros((1, 4), np.int32)), r"needs at least one track"),
    ],
)
def test_bad_forward_inputs(inputs, message):
    with pytest.raises(InputError, match=message):
        validate_inputs(inputs, "in.npz")


def test_nan_coordinates_are_masked_not_propagated():
    import jax
    import jax.numpy as jnp

    from esm3_jax.model.esm3 import ESM3, init_params

    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.v_heads=4"]).model
    params = init_params(cfg, jax.random.key(0))
    coords = np.random.default_rng(0).normal(size=(1, 6, 3, 3)).astype(np.float32) * 5
    coords[0, 2] = np.nan
    coords[0, 4, 1, 0] = np.inf
    coords[0, 5, 0, 0] = 1e9  # absurd: treated as missing
    out = jax.jit(ESM3(cfg).apply)({"params": params}, sequence_tokens=jnp.full((1, 6), 5), structure_coords=jnp.asarray(coords))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())

    def loss(p):
        o = ESM3(cfg).apply({"params": p}, sequence_tokens=jnp.full((1, 6), 5), structure_coords=jnp.asarray(coords))
        return jnp.sum(o["sequence_logits"])

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_heads=5", r"d_model=64 is not divisible by model.n_heads=5"),
        ("model.d_modle=64", r"unknown key 'd_modle'; did you mean 'd_model'"),
        ("model.n_layers=0", r"n_layers must be positive"),
        ("model.compute_dtype=float16", r"'float16' is not one of"),
        ("model.d_model=sixty", r"expected an integer"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])



def test_repeated_forward_calls_compile_once(jax_cache):
    """`forward` reuses one jitted function per config: a second call on inputs of the same
    shapes lowers and compiles nothing (jax reports each lowering as a monitoring event)."""
    import dataclasses

    import jax
    from jax._src import dispatch

    from esm3_jax.inference.forward import forward, make_forward
    from esm3_jax.model.esm3 import init_params

    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.v_heads=4", "model.n_layers=1"]).model
    # Random weights of the model's shapes, without compiling the initialiser.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                          jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    x = dict(sequence_tokens=np.full((2, 12), 5, np.int32))
    lowered: list[str] = []

    def count(name, secs, **kwargs):
        if name == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
            lowered.append(name)

    first = forward(cfg, params, x)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        second = forward(cfg, params, x)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert lowered == []
    for k in first:
        np.testing.assert_array_equal(first[k], second[k])
    assert make_forward(cfg) is make_forward(dataclasses.replace(cfg))
    assert make_forward(cfg) is not make_forward(dataclasses.replace(cfg, n_layers=2))
