"""VQ-VAE structure tokenizer: parity with the reference (`esm.models.vqvae`) on real chains with
the same random weights, invariances, the EMA codebook, the losses, conversion and the CLI."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.config import to_dict
from esm3_jax.model.codebook import COLLECTION, EMACodebook
from esm3_jax.model.vqvae import StructureDecoder, StructureEncoder
from esm3_jax.compat.tokenizer_weights import (
    decoder_export,
    decoder_from_torch,
    encoder_export,
    encoder_from_torch,
)
from esm3_jax.train.vqvae import loss as VL
from tests.reference import relative_error
from tests.paths import STRUCTURES

# Two small real chains: a 58-residue BPTI and a 70-residue capsid domain (registry data).
FILES = (("mdanalysis_mmcif/5PTI.cif.gz", "A"), ("biopython_tests/1A8O.cif.gz", "A"))
D, VH, DOUT, NCODES, DEC_HEADS = 64, 8, 16, 64, 4


def _need_data():
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")


def _chain(i=0):
    from esm3_jax.structure.io import load_chain

    _need_data()
    path, chain = FILES[i]
    return load_chain(STRUCTURES / path, chain)


def _perturb(torch, model):
    """Non-default values for every vector parameter so that a wrong mapping shows."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch", reason="the reference needs torch (pip install -e '.[test]')")
    vqvae = pytest.importorskip("esm.models.vqvae", reason="reference `esm` package not installed")
    torch.manual_seed(0)
    enc = vqvae.StructureTokenEncoder(d_model=D, n_heads=1, v_heads=VH, n_layers=2, d_out=DOUT, n_codes=NCODES).eval()
    dec = vqvae.StructureTokenDecoder(d_model=D, n_heads=DEC_HEADS, n_layers=2).eval()
    _perturb(torch, enc)
    _perturb(torch, dec)
    with torch.no_grad():
        enc.codebook.embeddings.normal_(0.0, 0.5)
    as_np = lambda m: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    return torch, enc, as_np(enc), dec, as_np(dec)


def _reference_encode(torch, enc, coords, residue_index):
    captured = {}

    def keep(module, inputs, output):  # returns None: the output is left as it is
        captured["z"] = output.detach().numpy().copy()

    hook = enc.pre_vq_proj.register_forward_hook(keep)
    with torch.no_grad():
        z_q, idx = enc.encode(torch.from_numpy(coords), residue_index=torch.from_numpy(residue_index.astype(np.int64)))
    hook.remove()
    return captured["z"], z_q.numpy(), idx.numpy()


def test_encoder_parity_on_real_chains(reference):
    torch, enc, state, _, _ = reference
    cfg, variables = encoder_from_torch(state)
    model = StructureEncoder(cfg)
    for i in range(len(FILES)):
        chain = _chain(i)
        coords = np.array(chain.backbone[None], np.float32)
        res = np.array(chain.residue_index[None], np.int32)
        coords[0, [3, 20]] = np.nan  # missing residues: ranked by sequence distance, no frame
        coords[0, 30, 1] = 5e6  # an absurd coordinate is masked the same way
        z_ref, zq_ref, idx_ref = _reference_encode(torch, enc, coords, res)
        z, has = jax.jit(lambda v, c, r: model.apply(v, c, r, method=StructureEncoder.encode_continuous))(variables, coords, res)
        out = jax.jit(lambda v, c, r: model.apply(v, c, r, method=StructureEncoder.encode))(variables, coords, res)
        assert relative_error(z, z_ref) < 1e-4
        assert relative_error(out["z_q"], zq_ref) < 1e-5
        np.testing.assert_array_equal(np.asarray(out["tokens"]), idx_ref)
        assert not np.asarray(has)[0, [3, 20, 30]].any() and np.asarray(has).sum() == coords.shape[1] - 3


def test_decoder_parity(reference):
    torch, enc, estate, dec, state = reference
    cfg, variables = decoder_from_torch(state, DEC_HEADS)
    chain = _chain(1)
    _, _, idx = _reference_encode(torch, enc, chain.backbone[None].astype(np.float32), chain.residue_index[None])
    tokens = np.concatenate([[T.STRUCTURE_BOS], idx[0], [T.STRUCTURE_EOS]])[None].astype(np.int32)
    tokens[0, 5] = T.STRUCTURE_MASK
    with torch.no_grad():
        ref = dec.decode(torch.from_numpy(tokens.astype(np.int64)))
    out = jax.jit(lambda v, t: StructureDecoder(cfg).apply(v, t))(variables, tokens)
    assert np.abs(np.asarray(out["backbone"]) - ref["bb_pred"].numpy()).max() < 1e-3  # Å
    for ours, theirs in (("plddt", "plddt"), ("pae", "predicted_aligned_error"), ("ptm", "ptm")):
        np.testing.assert_allclose(np.asarray(out[ours]), ref[theirs].numpy(), atol=1e-4, err_msg=ours)


def test_padded_decoding_matches_unpadded(reference):
    """Padding keys are masked, so a chain decodes the same alone or padded in a batch."""
    *_, state = reference
    cfg, variables = decoder_from_torch(state, DEC_HEADS)
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[T.STRUCTURE_BOS], rng.integers(0, 4096, 20), [T.STRUCTURE_EOS]]).astype(np.int32)
    padded = np.concatenate([tokens, np.full(10, T.STRUCTURE_PAD, np.int32)])
    f = jax.jit(lambda v, t: StructureDecoder(cfg).apply(v, t))
    a, b = f(variables, tokens[None]), f(variables, padded[None])
    np.testing.assert_allclose(np.asarray(b["backbone"])[0, :22], np.asarray(a["backbone"])[0], atol=1e-4)
    np.testing.assert_allclose(float(b["ptm"][0]), float(a["ptm"][0]), atol=1e-5)


def test_conversion_round_trip(reference):
    _, _, estate, _, dstate = reference
    ecfg, evars = encoder_from_torch(estate)
    back = encoder_export(evars, to_dict(ecfg))
    assert set(back) == set(estate) and all(np.array_equal(back[k], estate[k]) for k in estate)
    dcfg, dvars = decoder_from_torch(dstate, DEC_HEADS)
    back = decoder_export(dvars, to_dict(dcfg))
    assert set(back) == set(dstate) and all(np.array_equal(back[k], dstate[k]) for k in dstate)
    assert (ecfg.d_model, ecfg.v_heads, ecfg.d_out, ecfg.n_codes, ecfg.ffn_hidden) == (D, VH, DOUT, NCODES, 256)
    assert (dcfg.d_model, dcfg.n_layers, dcfg.n_heads) == (D, 2, DEC_HEADS)


def _random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_tokens_invariant_to_rigid_motion(reference):
    _, _, state, _, _ = reference
    cfg, variables = encoder_from_torch(state)
    chain = _chain(0)
    rng = np.random.default_rng(3)
    coords = chain.backbone.astype(np.float64)
    moved = coords @ _random_rotation(rng).T + rng.normal(size=3) * 50.0
    f = jax.jit(lambda v, c, r: StructureEncoder(cfg).apply(v, c, r, method=StructureEncoder.encode))
    res = chain.residue_index[None]
    a = f(variables, coords[None].astype(np.float32), res)
    b = f(variables, moved[None].astype(np.float32), res)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    assert relative_error(b["z"], a["z"]) < 1e-4


def test_ema_codebook_update_restart_and_straight_through():
    cb = EMACodebook(n_codes=4, dim=2, decay=0.5, restart_threshold=0.3)
    z = jnp.array([[[0.0, 0.0], [0.2, 0.0], [10.0, 10.0], [10.2, 10.0], [9.8, 10.0]]])
    mask = jnp.array([[True, True, True, True, False]])
    v = cb.init({"params": jax.random.PRNGKey(0)}, z, mask)
    codes = jnp.array([[0.0, 0.0], [10.0, 10.0], [50.0, 50.0], [-50.0, 50.0]])
    v = {COLLECTION: {"embeddings": codes, "cluster_size": jnp.ones(4), "embed_sum": codes}}
    (zq, idx, commit, metrics), new = cb.apply(v, z, mask, update=True, mutable=[COLLECTION], rngs={COLLECTION: jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(np.asarray(idx), [[0, 0, 1, 1, 1]])
    np.testing.assert_allclose(np.asarray(zq), np.asarray(codes[idx]))
    assert float(metrics["codebook_usage"]) == 0.5 and abs(float(metrics["codebook_perplexity"]) - 2.0) < 1e-5
    # EMA: cluster sizes 0.5*1 + 0.5*2 = 1.5 for the used codes, 0.5 for the others; the masked
    # row (9.8) does not count. Code 0 moves halfway to the mean of its two vectors (0.1, 0).
    state = new[COLLECTION]
    np.testing.assert_allclose(np.asarray(state["cluster_size"])[:2], [1.5, 1.5], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state["embeddings"])[0], [0.1 * 2 * 0.5 / 1.5, 0.0], atol=1e-4)
    # Unused codes fell to 0.5 >= 0.3: kept. One more unused step (0.25 < 0.3) restarts them at
    # valid encoder outputs, never at the masked one.
    (_, _, _, _), new2 = cb.apply(new, z, mask, update=True, mutable=[COLLECTION], rngs={COLLECTION: jax.random.PRNGKey(2)})
    restarted = np.asarray(new2[COLLECTION]["embeddings"])[2:]
    valid = np.asarray(z[0, :4])
    assert all(np.min(np.abs(valid - r).max(-1)) < 0.01 for r in restarted)
    # Commitment: 0.25 * mean squared distance to the (stopped) code; straight-through gradient.
    grad = jax.grad(lambda zz: jnp.sum(cb.apply(v, zz, mask)[0] * 3.0))(z)
    np.testing.assert_allclose(np.asarray(grad), 3.0)
    expected = 0.25 * np.mean(np.sum((np.asarray(z[0, :4]) - np.asarray(codes)[[0, 0, 1, 1]]) ** 2, -1) / 2)
    np.testing.assert_allclose(float(commit), expected, rtol=1e-5)


def test_losses_on_a_real_backbone():
    chain = _chain(0)
    true = jnp.asarray(chain.backbone[None], jnp.float32)
    mask = jnp.asarray(chain.backbone_mask[None])
    rot = _random_rotation(np.random.default_rng(0))
    moved = true @ jnp.asarray(rot.T, jnp.float32) + 7.0
    mirrored = true * jnp.array([-1.0, 1.0, 1.0])
    for loss in (VL.backbone_distance_loss, VL.backbone_direction_loss):
        assert float(loss(moved, true, mask)) < 1e-4
        noisy = true + jax.random.normal(jax.random.PRNGKey(0), true.shape)
        assert float(loss(noisy, true, mask)) > 0.1
    # Distances cannot tell a mirror image; the direction loss's triple products can.
    assert float(VL.backbone_distance_loss(mirrored, true, mask)) < 1e-4
    assert float(VL.backbone_direction_loss(mirrored, true, mask)) > 0.1
    # Classification targets: logits peaked on the true bins give a loss near 0.
    L = true.shape[1]
    cb = VL.virtual_cb(true)
    d = jnp.linalg.norm(cb[:, :, None] - cb[:, None], axis=-1)
    onehot = jax.nn.one_hot(jnp.sum(d[..., None] > VL.DISTOGRAM_EDGES, -1), 64) * 100.0
    assert float(VL.distogram_loss(onehot, true, mask)) < 1e-3
    assert float(VL.distogram_loss(jnp.zeros((1, L, L, 64)), true, mask)) == pytest.approx(np.log(64), rel=1e-4)
    per_res, per_chain = VL.lddt_ca(moved[:, :, 1], true[:, :, 1], mask)
    assert float(per_chain[0]) == pytest.approx(1.0) and float(jnp.min(per_res)) == pytest.approx(1.0)
    from esm3_jax.model.frames import backbone_frames

    r, t, _ = backbone_frames(true)
    pae_target_logits = jnp.zeros((1, L, L, 64)).at[..., 0].set(100.0)  # "0 Å error" everywhere
    assert float(VL.pae_loss(pae_target_logits, r, t, true, mask)) < 1e-3
    # FAPE: blind to a rigid motion, not to a mirror image (frames are proper rotations).
    fape = lambda x: float(VL.backbone_fape_loss(*backbone_frames(x)[:2], x, true, mask))
    assert fape(moved) < 1e-3
    assert fape(mirrored) > 0.3
    assert 0.05 < fape(true + 0.5 * jax.random.normal(jax.random.PRNGKey(1), true.shape)) < fape(mirrored)
    assert float(VL.plddt_loss(jnp.zeros((1, L, 50)).at[..., 49].set(100.0), true, true, mask)) < 1e-3


def test_decoder_frames_follow_the_loss_frame_convention():
    """FAPE and pAE see the decoder's atoms from its own (rot, trans) and the truth's from frames
    built out of its backbone: both must be the same frame of the same atoms, or the losses would
    compare points in two different coordinate systems."""
    from esm3_jax.model.frames import backbone_frames
    from esm3_jax.model.structure_heads import FrameHead

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 32))
    head = FrameHead(32)
    out = head.apply(head.init(jax.random.PRNGKey(1), x), x)
    rot, trans, _ = backbone_frames(out["backbone"])
    np.testing.assert_allclose(rot, out["rot"], atol=1e-5)
    np.testing.assert_allclose(trans, out["trans"], atol=1e-5)
    assert float(VL.backbone_fape_loss(out["rot"], out["trans"], out["backbone"], out["backbone"], jnp.ones((2, 7), bool))) < 1e-4
