"""All-atom coordinates from frames + torsions and torsions from atoms (structure/all_atom.py):
real chains rebuilt from their own torsions, a known residue, masks, special residue types,
symmetric side chains and gradients."""

from __future__ import annotations


import biotite.structure as struc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax.model.frames import backbone_frames
from esm3_jax.model.vqvae import AMINO_ACIDS, aa_indices
from esm3_jax.structure import all_atom as AA
from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure import rigid_groups as G
from tests.paths import STRUCTURES

# Registry chains (well-refined ones: older low-resolution entries deviate more from ideal
# geometry): BPTI (58 residues), a 58-residue chain of 7CFN, a 235-residue chain of 6WG6 and an
# LDH (314).
CHAINS = (
    ("mdanalysis_mmcif/5PTI.cif.gz", "A"),
    ("biopython_tests/7CFN.cif.gz", "G"),
    ("biopython_tests/6WG6.cif.gz", "D"),
    ("theseus_examples/ldh/2dfd_C.pdb.gz", "C"),
)
BUCKET = 128  # chains are padded to a multiple of this, so few shapes get compiled

build = jax.jit(AA.atom14_from_frames)
torsions = jax.jit(AA.torsion_angles)
to_atom37 = jax.jit(AA.atom14_to_atom37, static_argnames="fill")
to_atom14 = jax.jit(AA.atom37_to_atom14)
choose = jax.jit(AA.choose_symmetric_naming)


def _chain(path, chain):
    from esm3_jax.structure.io import load_chain

    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")
    return load_chain(STRUCTURES / path, chain)


@jax.jit
def _rebuild_padded(x37, aat):
    tors = AA.torsion_angles(x37, aat)
    rot, trans, frame_ok = backbone_frames(x37[:, :, :3])
    built, built_mask = AA.atom14_from_frames(rot, trans, aat, tors["sin_cos"])
    true, true_mask = AA.atom37_to_atom14(x37, aat)
    true, true_mask = AA.choose_symmetric_naming(built, true, true_mask, aat)
    return built, true, built_mask & true_mask & frame_ok[..., None], tors


def _rebuild(coords_Lx37x3, sequence):
    """Rebuild every atom from the chain's true backbone frames and its true torsions:
    (built atom14, true atom14 named like the build, atoms present in both, true torsions)."""
    L = len(sequence)
    P = -(-L // BUCKET) * BUCKET
    x37 = np.full((1, P, 37, 3), np.nan, np.float32)
    x37[0, :L] = coords_Lx37x3
    aat = np.full((1, P), 20, np.int32)
    aat[0, :L] = aa_indices(sequence)
    built, true, ok, tors = _rebuild_padded(x37, aat)
    cut = lambda v: np.asarray(v)[0, :L]
    return cut(built), cut(true), cut(ok), {k: cut(v) for k, v in tors.items()}


def test_real_chains_rebuild_from_their_true_torsions():
    errs = {"backbone N/CA/C": [], "O": [], "CB": [], "side chain beyond CB": []}
    for path, chain_id in CHAINS:
        c = _chain(path, chain_id)
        built, true, ok, _ = _rebuild(c.coords, c.sequence)
        err = np.linalg.norm(built - true, axis=-1)
        slot = np.broadcast_to(np.arange(14), err.shape)
        for name, sel in (("backbone N/CA/C", slot < 3), ("O", slot == 3), ("CB", slot == 4), ("side chain beyond CB", slot > 4)):
            errs[name].append(err[ok & sel])
    report = {}
    for name, parts in errs.items():
        e = np.concatenate(parts)
        report[name] = (len(e), float(np.sqrt(np.mean(e**2))), float(np.median(e)), float(np.percentile(e, 95)))
        print(f"{name:>22}: {len(e):5d} atoms, RMSD {report[name][1]:.3f} Å, median {report[name][2]:.3f}, p95 {report[name][3]:.3f}")
    # Ideal geometry against real geometry: the residual is bond-length and angle scatter only.
    assert report["backbone N/CA/C"][1] < 0.05
    assert report["O"][1] < 0.1 and report["CB"][1] < 0.1
    n_side, side_rmsd, side_median, _ = report["side chain beyond CB"]
    assert n_side > 1500 and side_rmsd < 0.35 and side_median < 0.15


def test_torsions_match_an_independent_dihedral():
    """phi, chi1, chi2 against biotite's dihedral; psi against biotite's psi to the next N."""
    c = _chain(*CHAINS[2])
    _, _, _, tors = _rebuild(c.coords, c.sequence)
    x = c.coords.astype(np.float64)
    angle = lambda sc: np.arctan2(sc[..., 0], sc[..., 1])
    wrap = lambda d: np.abs((d + np.pi) % (2 * np.pi) - np.pi)
    m = tors["mask"]
    phi_ref = struc.dihedral(x[:-1, rc.C_IDX], x[1:, rc.N_IDX], x[1:, rc.CA_IDX], x[1:, rc.C_IDX])
    assert wrap(angle(tors["sin_cos"][1:, 1]) - phi_ref)[m[1:, 1]].max() < 1e-3
    psi_ref = struc.dihedral(x[:-1, rc.N_IDX], x[:-1, rc.CA_IDX], x[:-1, rc.C_IDX], x[1:, rc.N_IDX])
    both = m[:-1, 2] & np.isfinite(psi_ref)
    # O and the next N lie in the peptide plane on either side of CA-C: psi agrees within a few degrees.
    assert np.median(wrap(angle(tors["sin_cos"][:-1, 2]) - psi_ref)[both]) < np.deg2rad(5)
    for k in (0, 1):
        checked = 0
        for i, aa in enumerate(c.sequence):
            res = G.IDEAL_RESIDUES.get(rc.RESTYPE_1TO3.get(aa, ""))
            if res is None or res.n_chi <= k or not m[i, 3 + k]:
                continue
            a, b, cc, d = (x[i, rc.ATOM37_INDEX[n]] for n in res.chi_path[k : k + 4])
            assert wrap(angle(tors["sin_cos"][i, 3 + k]) - struc.dihedral(a, b, cc, d)) < 1e-3
            checked += 1
        assert checked > 100


def _ideal_residue(aa: str, torsions_deg):
    """One residue built at the identity frame from torsion angles in degrees (TORSIONS order)."""
    t = np.deg2rad(np.asarray(torsions_deg, np.float64))
    sc = jnp.asarray(np.stack([np.sin(t), np.cos(t)], -1)[None, None], jnp.float32)
    rot, trans = jnp.eye(3)[None, None], jnp.zeros((1, 1, 3))
    aat = jnp.asarray([[AMINO_ACIDS.index(aa)]])
    x14, m14 = build(rot, trans, aat, sc)
    x37, m37 = to_atom37(x14, aat, fill=np.nan)
    return np.asarray(x37)[0, 0], np.asarray(m37)[0, 0], aat


def test_known_residue_lysine():
    x, m, aat = _ideal_residue("K", [180, -60, 140, -65, 175, -170, 60])
    names = [rc.ATOM37_NAMES[i] for i in np.flatnonzero(m)]
    assert sorted(names) == sorted(["N", "CA", "C", "O", "CB", "CG", "CD", "CE", "NZ"])
    at = {n: x[rc.ATOM37_INDEX[n]].astype(np.float64) for n in names}
    # ESM3's frame: CA at the origin, C on -x, N in the +y half of the xy-plane.
    np.testing.assert_allclose(at["CA"], 0, atol=1e-6)
    assert at["C"][0] < -1.5 and abs(at["C"][1]) < 1e-6 and at["N"][1] > 1.3
    bond = lambda a, b: np.linalg.norm(at[a] - at[b])
    for a, b, length in (("CA", "CB", 1.53), ("CB", "CG", 1.52), ("CG", "CD", 1.52), ("CD", "CE", 1.52), ("CE", "NZ", 1.49), ("C", "O", 1.23)):
        assert bond(a, b) == pytest.approx(length, abs=0.015), (a, b)
    deg = lambda *n: np.rad2deg(struc.dihedral(*(at[k] for k in n)))
    assert deg("N", "CA", "CB", "CG") == pytest.approx(-65, abs=0.01)
    assert deg("CA", "CB", "CG", "CD") == pytest.approx(175, abs=0.01)
    assert deg("CB", "CG", "CD", "CE") == pytest.approx(-170, abs=0.01)
    assert deg("CG", "CD", "CE", "NZ") == pytest.approx(60, abs=0.01)
    assert deg("N", "CA", "C", "O") == pytest.approx(140 - 180, abs=0.01)
    # And back: the torsions of the built residue are the ones it was built from.
    tors = torsions(jnp.asarray(x[None, None]), aat)
    got = np.rad2deg(np.arctan2(*np.moveaxis(np.asarray(tors["sin_cos"])[0, 0], -1, 0)))
    np.testing.assert_allclose(got[2:], [140, -65, 175, -170, 60], atol=0.01)
    assert np.asarray(tors["mask"])[0, 0].tolist() == [False, False, True, True, True, True, True]


def test_glycine_alanine_and_unknown_residues_have_no_chis():
    seq_aat = jnp.asarray([[AMINO_ACIDS.index("G"), AMINO_ACIDS.index("A"), 20, -3, 99]])
    sc = jnp.tile(jnp.asarray([0.6, 0.8]), (1, 5, 7, 1))
    rot, trans = jnp.tile(jnp.eye(3), (1, 5, 1, 1)), jnp.arange(15.0).reshape(1, 5, 3) * 3.8
    x14, m14 = build(rot, trans, seq_aat, sc)
    assert np.asarray(m14).sum(-1).tolist() == [[4, 5, 4, 4, 4]]  # unknown and bad ids: backbone only
    assert np.isfinite(np.asarray(x14)).all()
    x37, m37 = to_atom37(x14, seq_aat, fill=np.nan)
    tors = torsions(x37, seq_aat)
    assert not np.asarray(tors["mask"])[..., 3:].any()
    # The pure-chi tables agree: no residue type without side-chain torsions has a chi.
    assert not G.TABLES["chi_mask"][[AMINO_ACIDS.index("G"), AMINO_ACIDS.index("A"), 20]].any()
    assert G.TABLES["chi_mask"].sum(1)[[AMINO_ACIDS.index(a) for a in "RKVF"]].tolist() == [4, 4, 1, 2]


def test_masks_for_missing_atoms_gaps_and_nan():
    c = _chain(*CHAINS[0])
    x = np.array(c.coords)
    aat = aa_indices(c.sequence)
    lys = next(i for i in range(5, len(aat)) if c.sequence[i] == "K" and np.isfinite(x[i, rc.ATOM37_INDEX["NZ"]]).all())
    x[lys, rc.ATOM37_INDEX["CD"]] = np.nan  # chi2 (CA CB CG CD), chi3 and chi4 need it
    x[lys - 2, rc.O_IDX] = np.inf  # psi needs O
    x[lys - 3, rc.C_IDX] = 1e7  # absurd: missing; the next residue loses omega and phi
    tors = {k: np.asarray(v)[0] for k, v in torsions(jnp.asarray(x[None]), jnp.asarray(aat[None])).items()}
    m = tors["mask"]
    assert m[lys].tolist() == [True, True, True, True, False, False, False]
    assert m[lys - 2].tolist()[:3] == [False, False, False]  # no O; the previous C is absurd
    assert m[lys - 3].tolist()[:3] == [True, False, False]  # its own C is missing: no phi, no psi
    assert not m[0, :2].any()  # no previous residue
    assert np.isfinite(tors["sin_cos"]).all() and (tors["sin_cos"][~m] == 0).all()
    # A chain break: residue j's omega/phi are masked when C(j-1)-N(j) is no peptide bond.
    y = np.array(c.coords)
    y[20:] += np.array([0.0, 0.0, 3.0], np.float32)
    mb = np.asarray(torsions(jnp.asarray(y[None]), jnp.asarray(aat[None]))["mask"])[0]
    assert not mb[20, :2].any() and mb[19, :2].all() and mb[21, :2].all() and mb[20, 2]
    # atom14 of real coordinates: present atoms only, zeros elsewhere.
    a14, m14 = to_atom14(jnp.asarray(x[None]), jnp.asarray(aat[None]))
    a14, m14 = np.asarray(a14)[0], np.asarray(m14)[0]
    assert not m14[lys, 6] and m14[lys, 5] and not m14[lys - 2, 3] and not m14[lys - 3, 2]
    assert np.isfinite(a14).all() and (a14[~m14] == 0).all()


def test_pi_periodic_alternatives_and_symmetric_naming():
    c = _chain(*CHAINS[2])
    built, true, ok, tors = _rebuild(c.coords, c.sequence)
    differs = ~np.isclose(tors["sin_cos"], tors["alt_sin_cos"]).all(-1) & tors["mask"]
    for i, aa in enumerate(c.sequence):
        expect = {"D": [4], "E": [5], "F": [4], "Y": [4]}.get(aa, [])
        assert np.flatnonzero(differs[i]).tolist() == [k for k in expect if tors["mask"][i, k]]
    assert differs.sum() > 20
    np.testing.assert_allclose(tors["alt_sin_cos"][differs], -tors["sin_cos"][differs], atol=1e-6)

    # Swap OD1/OD2 of every ASP in the truth: against a prediction built with the deposited
    # naming, the choice swaps them back.
    x = np.array(c.coords)
    asp = np.array([a == "D" for a in c.sequence]) & ok[:, 7]
    od1, od2 = rc.ATOM37_INDEX["OD1"], rc.ATOM37_INDEX["OD2"]
    x[asp, od1], x[asp, od2] = c.coords[asp, od2], c.coords[asp, od1]
    aj = jnp.asarray(aa_indices(c.sequence)[None])
    swapped, mask = to_atom14(jnp.asarray(x[None]), aj)
    chosen, chosen_mask = choose(jnp.asarray(built[None]), swapped, mask, aj)
    assert asp.sum() >= 8
    np.testing.assert_array_equal(np.asarray(chosen)[0, asp], true[asp])
    np.testing.assert_array_equal(np.asarray(chosen_mask)[0], np.asarray(mask)[0])
    # Residues without the ambiguity are left alone.
    others = np.array([a not in "DEFY" for a in c.sequence])
    np.testing.assert_array_equal(np.asarray(chosen)[0, others], np.asarray(swapped)[0, others])


def test_gradients_are_finite_even_for_degenerate_input():
    c = _chain(*CHAINS[0])
    x = np.array(c.coords[None, :16])
    x[0, 3] = np.nan
    aat = jnp.asarray(aa_indices(c.sequence[:16])[None])
    rot, trans, _ = backbone_frames(jnp.asarray(x[:, :, :3]))
    sc = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 7, 2)).at[0, 2].set(0.0)  # a (0, 0) pair too

    def f(rot, trans, sc, coords):
        x14, m14 = AA.atom14_from_frames(rot, trans, aat, sc)
        tors = AA.torsion_angles(coords, aat)
        return jnp.sum(jnp.where(m14[..., None], x14, 0.0) ** 2) + jnp.sum(tors["sin_cos"] * tors["mask"][..., None])

    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(rot, trans, sc, jnp.asarray(x))
    for g in grads[:3]:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
    g_coords = np.asarray(grads[3])
    assert np.isfinite(np.nan_to_num(g_coords, nan=0.0)).all() and np.isfinite(g_coords[0, 4:]).all()


def test_atom14_atom37_round_trip():
    c = _chain(*CHAINS[0])
    aat = jnp.asarray(aa_indices(c.sequence)[None])
    a14, m14 = to_atom14(jnp.asarray(c.coords[None]), aat)
    back, m37 = to_atom37(a14, aat, fill=np.nan)
    known = np.asarray(aat)[0] < 20
    # Every atom of a standard residue comes back; atoms outside a type's set (e.g. OXT) do not.
    keep = np.asarray(m37)[0] & c.atom_mask
    np.testing.assert_array_equal(np.asarray(back)[0][keep], c.coords[keep])
    standard = G.TABLES["atom37_mask"][np.asarray(aat)[0]]
    assert (c.atom_mask & ~standard)[known].sum() <= known.sum()  # at most an OXT per residue
