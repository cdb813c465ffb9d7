"""Backbone frames, oxygen placement, superposition and structure metrics (esm3_jax.structure.geometry)."""

from __future__ import annotations


import numpy as np
import pytest

from esm3_jax.structure import geometry as geo
from esm3_jax.structure import io
from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure.chain import ProteinChain
from tests.paths import STRUCTURES

needs_data = pytest.mark.skipif(
    not (STRUCTURES / "index.jsonl").is_file(), reason=f"real structure data not found at {STRUCTURES}"
)


def _chain(file="biopython_tests/1GBT.cif.gz", chain="A") -> ProteinChain:
    return io.load_chain(STRUCTURES / file, chain)


def _random_rotation(rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_ideal_backbone_is_the_spec_geometry():
    n, ca, c = geo.IDEAL_BACKBONE_3x3
    np.testing.assert_array_equal(geo.IDEAL_BACKBONE_3x3, np.float32([[0.5256, 1.3612, 0], [0, 0, 0], [-1.5251, 0, 0]]))
    assert abs(np.linalg.norm(n - ca) - 1.459) < 2e-3  # N-CA bond
    assert abs(np.linalg.norm(c - ca) - 1.525) < 1e-3  # CA-C bond
    # The ideal backbone is its own frame: identity rotation, origin at CA.
    rot, trans, mask = geo.backbone_frames(geo.IDEAL_BACKBONE_3x3[None])
    np.testing.assert_allclose(rot[0], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(trans[0], 0, atol=1e-7)
    assert mask.all()


@needs_data
def test_frames_follow_the_spec_convention_on_a_real_chain():
    chain = _chain()
    rot, trans, mask = geo.backbone_frames(chain.backbone)
    assert mask.all()
    np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    local = np.einsum("lij,lai->laj", rot, chain.backbone - trans[:, None])  # R^T (x - t)
    np.testing.assert_allclose(local[:, 1], 0, atol=1e-4)  # CA at the origin
    assert (local[:, 2, 0] < 0).all()  # C on -x
    np.testing.assert_allclose(local[:, 2, 1:], 0, atol=1e-4)
    assert (local[:, 0, 1] > 0).all()  # N in the +y half of the xy-plane
    np.testing.assert_allclose(local[:, 0, 2], 0, atol=1e-4)
    # Rebuilding the backbone from frames with the ideal geometry is close to the real one.
    assert geo.rmsd(geo.ideal_backbone(rot, trans), chain.backbone, superpose=False) < 0.1


def test_missing_residues_get_the_black_hole_frame():
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(6, 3, 3)).astype(np.float32) * 3
    coords[2, 1] = np.nan
    coords[4, 0, 2] = 2e6  # absurd counts as missing, as in the spec
    rot, trans, mask = geo.backbone_frames(coords)
    np.testing.assert_array_equal(mask, [True, True, False, True, False, True])
    mean = coords[mask].mean(0)
    np.testing.assert_allclose(trans[2], mean[1], rtol=1e-5)
    np.testing.assert_allclose(trans[4], mean[1], rtol=1e-5)
    expected = geo.gram_schmidt(mean[1] - mean[2], mean[0] - mean[1])
    np.testing.assert_allclose(rot[2], expected, atol=1e-5)
    # No coordinates at all: identity frames at the origin.
    rot, trans, mask = geo.backbone_frames(np.full((3, 3, 3), np.nan))
    assert not mask.any()
    np.testing.assert_array_equal(rot, np.broadcast_to(np.eye(3), (3, 3, 3)))
    np.testing.assert_array_equal(trans, 0)


@needs_data
def test_numpy_frames_agree_with_the_model_frames():
    frames = pytest.importorskip("esm3_jax.model.frames", reason="the model's jnp frames are not written yet")
    import jax.numpy as jnp

    chain = _chain()
    coords = np.stack([chain.backbone, chain.backbone.copy()])
    coords[1, ::7] = np.nan  # black-hole frames too
    rot, trans, mask = geo.backbone_frames(coords)
    jrot, jtrans, jmask = frames.backbone_frames(jnp.asarray(coords))
    np.testing.assert_array_equal(mask, np.asarray(jmask))
    np.testing.assert_allclose(rot[mask], np.asarray(jrot)[mask], atol=1e-5)
    np.testing.assert_allclose(trans, np.asarray(jtrans), atol=1e-4)
    # The black-hole rotation comes from the protein's mean N, CA and C, which lie within a
    # fraction of an Å of each other: float32 summation order alone moves it by ~1e-4.
    np.testing.assert_allclose(rot[~mask], np.asarray(jrot)[~mask], atol=1e-3)


@needs_data
def test_oxygen_placed_from_the_backbone_matches_the_observed_oxygen():
    errors = []
    for file, chain_id in [("biopython_tests/1GBT.cif.gz", "A"), ("biopython_tests/1A8O.cif.gz", "A")]:
        chain = _chain(file, chain_id)
        placed = geo.place_oxygen(chain.backbone)
        assert np.isnan(placed[-1]).all()  # no next residue
        errors.append(np.linalg.norm(placed - chain.coords[:, rc.O_IDX], axis=-1))
    err = np.concatenate(errors)
    err = err[np.isfinite(err)]
    assert len(err) > 250
    assert np.median(err) < 0.15 and np.percentile(err, 95) < 0.3, (np.median(err), np.percentile(err, 95))

    # A gap in the chain (the next residue is far away) leaves O undefined.
    bb = chain.backbone.copy()
    bb[10:] += 20.0
    assert np.isnan(geo.place_oxygen(bb)[9]).all() and np.isfinite(geo.place_oxygen(bb)[8]).all()
    # with_oxygen fills only what is missing unless told otherwise.
    coords = chain.coords.copy()
    coords[5, rc.O_IDX] = np.nan
    filled = geo.with_oxygen(coords)
    np.testing.assert_array_equal(filled[4, rc.O_IDX], coords[4, rc.O_IDX])
    np.testing.assert_allclose(filled[5, rc.O_IDX], chain.coords[5, rc.O_IDX], atol=0.4)


@needs_data
def test_kabsch_recovers_a_rigid_motion():
    rng = np.random.default_rng(1)
    x = _chain().coords[:, rc.CA_IDX]
    rot_true, t_true = _random_rotation(rng), rng.normal(size=3) * 10
    y = x @ rot_true.T + t_true
    rot, t = geo.kabsch(x, y)
    np.testing.assert_allclose(rot, rot_true, atol=1e-5)
    np.testing.assert_allclose(t, t_true, atol=1e-3)
    assert geo.rmsd(x, y) < 1e-4
    assert geo.rmsd(x, y, superpose=False) > 1.0
    # A mirror image cannot be superposed by a rotation: Kabsch never returns a reflection.
    rot, _ = geo.kabsch(x, x * [1, 1, -1])
    assert np.linalg.det(rot) > 0.999
    assert geo.rmsd(x, x * [1, 1, -1]) > 1.0
    # Missing points are left out.
    x_missing = x.copy()
    x_missing[::5] = np.nan
    assert geo.rmsd(x_missing, y) < 1e-4
    with pytest.raises(ValueError, match="at least 3"):
        geo.kabsch(x[:2], y[:2])


def test_rmsd_of_a_known_displacement():
    a = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float)
    b = a.copy()
    b[0] += [0, 0, 2.0]
    assert geo.rmsd(a, b, superpose=False) == pytest.approx(1.0)  # sqrt(4 / 4)


def test_lddt_on_a_hand_example():
    # Three CAs on a line 3 Å apart; the prediction stretches the last bond by 1.5 Å.
    true = np.array([[0, 0, 0], [3, 0, 0], [6, 0, 0]], float)[:, None]
    pred = np.array([[0, 0, 0], [3, 0, 0], [7.5, 0, 0]], float)[:, None]
    # Pairs (0,1) err 0 -> 1; (1,2) err 1.5 -> 0.5; (0,2) err 1.5 -> 0.5.
    assert geo.lddt(pred, true) == pytest.approx(2 / 3)
    np.testing.assert_allclose(geo.lddt(pred, true, per_residue=True), [0.75, 0.75, 0.5])
    # Pair (0,2) is 6 Å apart in the truth, outside a 4 Å inclusion radius, so it is not scored.
    assert geo.lddt(pred, true, cutoff=4.0) == pytest.approx(0.75)


@needs_data
def test_lddt_matches_the_reference_implementation():
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("esm.utils.structure.metrics")
    chain = _chain()
    rng = np.random.default_rng(2)
    pred = chain.coords + rng.normal(0, 0.8, chain.coords.shape).astype(np.float32)
    # Rigid motions do not change LDDT.
    rot = _random_rotation(rng)
    moved = pred @ rot.T.astype(np.float32) + 7.0

    ref_inputs = (torch.tensor(pred[None]), torch.tensor(chain.coords[None]), torch.tensor(chain.atom_mask[None]))
    ref_ca = metrics.compute_lddt_ca(*ref_inputs, per_residue=False)
    assert geo.lddt_ca(moved, chain.coords) == pytest.approx(float(ref_ca), abs=1e-5)
    ref_ca_res = metrics.compute_lddt_ca(*ref_inputs, per_residue=True)
    np.testing.assert_allclose(geo.lddt_ca(pred, chain.coords, per_residue=True), ref_ca_res[0].numpy(), atol=1e-5)

    # The reference's all-atom variant flattens atoms, so it also scores pairs within a residue.
    # (It builds dense (37 L)^2 matrices: compare on 80 residues to keep the test fast.)
    pred80, true80 = pred[:80], chain.coords[:80]
    flat = lambda a: torch.tensor(np.nan_to_num(a).reshape(1, -1, 3))  # noqa: E731
    mask80 = torch.tensor(chain.atom_mask[:80].reshape(1, -1, 1), dtype=torch.float32)
    ref_all = metrics.compute_lddt(flat(pred80), flat(true80), mask80, per_residue=False)
    assert geo.lddt(pred80, true80, exclude_intra_residue=False) == pytest.approx(float(ref_all), abs=1e-5)
    standard = geo.lddt(pred, chain.coords)
    assert 0.5 < standard < 0.9 and geo.lddt(chain.coords, chain.coords) == 1.0


@needs_data
def test_tm_score_separates_homologues_from_unrelated_folds():
    trypsin_a = _chain("theseus_examples/trypsins/1TRN_A.pdb.gz", "A")
    trypsin_b = _chain("biopython_tests/1GBT.cif.gz", "A")
    ldh = _chain("theseus_examples/ldh/3ldh_A.pdb.gz", "A")
    ca = lambda c: c.coords[:, rc.CA_IDX]  # noqa: E731
    assert geo.tm_score(ca(trypsin_a), ca(trypsin_a), trypsin_a.sequence, trypsin_a.sequence) == pytest.approx(1.0)
    homologues = geo.tm_score(ca(trypsin_a), ca(trypsin_b), trypsin_a.sequence, trypsin_b.sequence)
    unrelated = geo.tm_score(ca(ldh), ca(trypsin_b), ldh.sequence, trypsin_b.sequence)
    assert homologues > 0.8 and unrelated < 0.4, (homologues, unrelated)
    # Noise lowers it; rigid motion does not.
    rng = np.random.default_rng(3)
    noisy = ca(trypsin_b) @ _random_rotation(rng).T + rng.normal(0, 1.0, ca(trypsin_b).shape)
    noisy_score = geo.tm_score(noisy, ca(trypsin_b), trypsin_b.sequence, trypsin_b.sequence)
    assert 0.5 < noisy_score < 0.99
