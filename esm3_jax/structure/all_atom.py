"""All heavy atoms from backbone frames and torsion angles, and torsion angles from atoms, in jnp.

Forward (AlphaFold 2's Algorithm 24, on the rigid groups of rigid_groups.py): each residue's
psi and chi groups are turned about their x-axes by the torsion angles and chained onto the
backbone frame (chi k hangs on chi k-1); every atom is placed from its group's frame at its
ideal position. Inverse: the seven torsions (omega, phi, psi, chi1-4) of real atom37
coordinates, with masks and the alternative (pi-shifted) angle of pi-periodic chis.

Everything is differentiable, fp32 and batched over any leading dimensions (the torsion read-out
needs the residue axis at -3 of atom37, to reach the previous residue). Frames come in ESM3's
convention (model/frames.py: C on the frame's -x axis); the ideal geometry is tabulated in
AlphaFold's (C on +x), and the two differ by a half-turn about y.

Angles travel as (sin, cos) pairs. Bad input is masked, never raised inside a batch: residue
types outside 0..20 are built as unknown (backbone only), missing or non-finite atoms drop the
torsions that need them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure.rigid_groups import (
    AMBIGUOUS_SLOTS,
    FIRST_CHI_TORSION,
    N_TORSIONS,
    PSI_TORSION,
    TABLES,
    UNKNOWN_RESTYPE,
)

# ESM3 frame -> AlphaFold frame: negate the x and z axes (a rotation by pi about y).
_ESM_TO_AF2_AXES = np.array([-1.0, 1.0, -1.0], np.float32)
# Coordinates at or beyond this magnitude are corrupt, not far (model/frames.py's bound).
_MAX_COORDINATE = 1e6
# A C(i-1)-N(i) distance beyond this is a chain gap, not a peptide bond (geometry.py's bound):
# omega and phi are undefined across it.
_MAX_PEPTIDE_BOND = 2.0
_EPS = 1e-8


def _table(name: str, aatype):
    return jnp.asarray(TABLES[name])[aatype]


def _clean_aatype(aatype) -> jnp.ndarray:
    a = jnp.asarray(aatype, jnp.int32)
    return jnp.where((a < 0) | (a > UNKNOWN_RESTYPE), UNKNOWN_RESTYPE, a)


def normalize_torsions(sin_cos_Tx2: jnp.ndarray) -> jnp.ndarray:
    """(sin, cos) pairs scaled to unit length (the network's raw pairs are not)."""
    x = sin_cos_Tx2.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x**2, axis=-1, keepdims=True) + _EPS)


def _rot_x(sin_cos_x2: jnp.ndarray) -> jnp.ndarray:
    """(..., 3, 3) rotation about x by the angle of unit (sin, cos) pairs."""
    s, c = sin_cos_x2[..., 0], sin_cos_x2[..., 1]
    one, zero = jnp.ones_like(s), jnp.zeros_like(s)
    rows = [jnp.stack([one, zero, zero], -1), jnp.stack([zero, c, -s], -1), jnp.stack([zero, s, c], -1)]
    return jnp.stack(rows, axis=-2)


def _compose(rot_a, trans_a, rot_b, trans_b):
    """Frame a then frame b (b expressed in a): x -> R_a (R_b x + t_b) + t_a."""
    return rot_a @ rot_b, jnp.einsum("...ij,...j->...i", rot_a, trans_b) + trans_a


def group_frames(rot_Lx3x3: jnp.ndarray, trans_Lx3: jnp.ndarray, aatype_L: jnp.ndarray, torsions_Lx7x2: jnp.ndarray):
    """Global frames of the 6 rigid groups (backbone, psi, chi1-4): (..., L, 6, 3, 3), (..., L, 6, 3).

    rot/trans are ESM3-convention backbone frames; torsions are (sin, cos) in TORSIONS order
    (normalised here). A chi the residue lacks gives a frame that carries no atom.
    """
    aatype = _clean_aatype(aatype_L)
    rot_bb = rot_Lx3x3.astype(jnp.float32) * jnp.asarray(_ESM_TO_AF2_AXES)  # scales the columns
    trans_bb = trans_Lx3.astype(jnp.float32)
    unit = normalize_torsions(torsions_Lx7x2)
    d_rot, d_trans = _table("default_rot", aatype), _table("default_trans", aatype)  # (..., L, 6, ...)
    turn = _rot_x(unit[..., PSI_TORSION:, :])  # (..., L, 5, 3, 3): psi, chi1..chi4
    # Each group's frame in the backbone frame: its default frame turned by its torsion, chained
    # onto its parent (psi and chi1 onto the backbone, chi k onto chi k-1).
    local = [(d_rot[..., g, :, :] @ turn[..., g - 1, :, :], d_trans[..., g, :]) for g in range(1, 6)]
    in_bb = [local[0], local[1]]
    for g in range(2, 5):
        in_bb.append(_compose(*in_bb[-1], *local[g]))
    rots, transs = [rot_bb], [trans_bb]
    for r, t in in_bb:
        gr, gt = _compose(rot_bb, trans_bb, r, t)
        rots.append(gr)
        transs.append(gt)
    return jnp.stack(rots, axis=-3), jnp.stack(transs, axis=-2)


def atom14_from_frames(rot_Lx3x3, trans_Lx3, aatype_L, torsions_Lx7x2) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(atom14 coordinates (..., L, 14, 3), mask (..., L, 14)); absent slots are 0 and False."""
    aatype = _clean_aatype(aatype_L)
    g_rot, g_trans = group_frames(rot_Lx3x3, trans_Lx3, aatype, torsions_Lx7x2)
    group_L14 = _table("atom14_group", aatype)
    rot_L14 = jnp.take_along_axis(g_rot, group_L14[..., None, None], axis=-3)
    trans_L14 = jnp.take_along_axis(g_trans, group_L14[..., None], axis=-2)
    local = _table("atom14_position", aatype)
    xyz = jnp.einsum("...ij,...j->...i", rot_L14, local) + trans_L14
    mask = _table("atom14_mask", aatype)
    return jnp.where(mask[..., None], xyz, 0.0), mask


def atom14_to_atom37(atom14_Lx14x3, aatype_L, fill: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(atom37 (..., L, 37, 3), mask (..., L, 37)); slots the residue type lacks hold `fill`."""
    aatype = _clean_aatype(aatype_L)
    idx = _table("atom37_to_atom14", aatype)
    mask = _table("atom37_mask", aatype)
    xyz = jnp.take_along_axis(atom14_Lx14x3, idx[..., None], axis=-2)
    return jnp.where(mask[..., None], xyz, fill), mask


def atom37_to_atom14(atom37_Lx37x3, aatype_L) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Real atom37 coordinates (NaN = missing) -> (atom14 (..., L, 14, 3), mask (..., L, 14)).

    The mask holds the atoms the residue type has and the structure resolves (finite, sane);
    missing atoms are 0 so that no NaN reaches arithmetic or gradients.
    """
    aatype = _clean_aatype(aatype_L)
    x = jnp.asarray(atom37_Lx37x3, jnp.float32)
    idx = _table("atom14_to_atom37", aatype)
    xyz = jnp.take_along_axis(x, idx[..., None], axis=-2)
    present = jnp.all(jnp.isfinite(xyz) & (jnp.abs(xyz) < _MAX_COORDINATE), axis=-1) & _table("atom14_mask", aatype)
    return jnp.where(present[..., None], xyz, 0.0), present


def dihedral_sin_cos(a, b, c, d) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Unit (sin, cos) of the dihedral a-b-c-d (..., 2) and whether it is defined (...).

    Measured as the builder turns groups: in the frame with origin c, x along b -> c and a in
    the xy-plane at y > 0, d sits at angle atan2(z, y). This is the IUPAC sign convention.
    """
    e1 = c - b
    e1 = e1 / jnp.sqrt(jnp.sum(e1**2, -1, keepdims=True) + _EPS)
    u = a - b
    u = u - e1 * jnp.sum(u * e1, -1, keepdims=True)
    u_norm = jnp.sqrt(jnp.sum(u**2, -1, keepdims=True) + _EPS)
    e2 = u / u_norm
    e3 = jnp.cross(e1, e2)
    v = d - c
    y, z = jnp.sum(v * e2, -1), jnp.sum(v * e3, -1)
    r = jnp.sqrt(y**2 + z**2 + _EPS)
    ok = (u_norm[..., 0] > 1e-3) & (r > 1e-3)  # collinear atoms: no defined angle
    return jnp.stack([z / r, y / r], axis=-1), ok


def _previous_residue(v: jnp.ndarray, residue_axis: int) -> jnp.ndarray:
    """v shifted one residue along its residue axis; the first residue's predecessor is zeros."""
    v = jnp.moveaxis(v, residue_axis, 0)
    return jnp.moveaxis(jnp.concatenate([jnp.zeros_like(v[:1]), v[:-1]]), 0, residue_axis)


def torsion_angles(atom37_Lx37x3, aatype_L) -> dict[str, jnp.ndarray]:
    """The seven torsions of real coordinates: sin_cos and alt_sin_cos (..., L, 7, 2), mask (..., L, 7).

    omega = CA(i-1)-C(i-1)-N-CA, phi = C(i-1)-N-CA-C, both undefined at a chain start or gap;
    psi = N-CA-C-O + pi (the angle the builder turns O by); chi1-4 by each residue type's chi
    path. alt_sin_cos differs from sin_cos only for the pi-periodic chis (ASP chi2, GLU chi3, PHE
    chi2, TYR chi2), shifted by pi. Masked-out torsions read (0, 0).
    """
    aatype = _clean_aatype(aatype_L)
    x = jnp.asarray(atom37_Lx37x3, jnp.float32)
    present = jnp.all(jnp.isfinite(x) & (jnp.abs(x) < _MAX_COORDINATE), axis=-1)  # (..., L, 37)
    x = jnp.where(present[..., None], x, 0.0)
    prev_x, prev_present = _previous_residue(x, -3), _previous_residue(present, -2)
    N, CA, C, O = rc.N_IDX, rc.CA_IDX, rc.C_IDX, rc.O_IDX

    def quad(pairs):  # [(atom index, from previous residue?)] * 4 -> points (..., L, 4, 3), ok (..., L)
        pts = [(prev_x if p else x)[..., i, :] for i, p in pairs]
        ok = [(prev_present if p else present)[..., i] for i, p in pairs]
        return jnp.stack(pts, axis=-2), jnp.all(jnp.stack(ok, -1), -1)

    omega, omega_ok = quad([(CA, True), (C, True), (N, False), (CA, False)])
    phi, phi_ok = quad([(C, True), (N, False), (CA, False), (C, False)])
    psi, psi_ok = quad([(N, False), (CA, False), (C, False), (O, False)])
    bonded = jnp.sqrt(jnp.sum((prev_x[..., C, :] - x[..., N, :]) ** 2, -1)) <= _MAX_PEPTIDE_BOND
    chi_idx = _table("chi_atom37", aatype)  # (..., L, 4 chis, 4 atoms)
    chi_pts = jnp.take_along_axis(x[..., None, :, :], chi_idx[..., None], axis=-2)  # (..., L, 4, 4, 3)
    chi_ok = jnp.all(jnp.take_along_axis(present[..., None, :], chi_idx, axis=-1), -1) & _table("chi_mask", aatype)

    pts = jnp.concatenate([omega[..., None, :, :], phi[..., None, :, :], psi[..., None, :, :], chi_pts], axis=-3)
    sin_cos, defined = dihedral_sin_cos(pts[..., 0, :], pts[..., 1, :], pts[..., 2, :], pts[..., 3, :])
    mask = jnp.concatenate([(omega_ok & bonded)[..., None], (phi_ok & bonded)[..., None], psi_ok[..., None], chi_ok], -1)
    mask = mask & defined
    flip_psi = jnp.asarray(np.where(np.arange(N_TORSIONS) == PSI_TORSION, -1.0, 1.0), jnp.float32)
    sin_cos = sin_cos * flip_psi[:, None]
    periodic = jnp.concatenate([jnp.zeros(aatype.shape + (FIRST_CHI_TORSION,), bool), _table("chi_pi_periodic", aatype)], -1)
    alt = jnp.where(periodic[..., None], -sin_cos, sin_cos)
    zero = lambda v: jnp.where(mask[..., None], v, 0.0)
    return {"sin_cos": zero(sin_cos), "alt_sin_cos": zero(alt), "mask": mask}


def _slots(x_Lx14x3, idx_Lx14):
    return jnp.take_along_axis(x_Lx14x3, idx_Lx14[..., None], axis=-2)


def _slot_mask(m_Lx14, idx_Lx14):
    return jnp.take_along_axis(m_Lx14, idx_Lx14, axis=-1)


def choose_symmetric_naming(pred_BxLx14x3, true_BxLx14x3, true_mask_BxLx14, aatype_BxL):
    """The true atom14 with each symmetric side chain (ASP, GLU, PHE, TYR) named as the
    prediction is: per residue, the naming (given or swapped) whose ambiguous atoms' distances to
    every residue's N, CA, C, O and CB better match the predicted ones. Returns (atom14, mask).

    Without it, a side chain predicted half a turn from the deposited naming would be penalised
    for a difference no experiment can see. No gradient flows through the choice.
    """
    aatype = _clean_aatype(aatype_BxL)
    swap = _table("atom14_swap", aatype)
    alt = _slots(true_BxLx14x3, swap)
    alt_mask = _slot_mask(true_mask_BxLx14, swap)
    B, L = aatype.shape
    amb, ref = list(AMBIGUOUS_SLOTS), slice(0, 5)
    flat = lambda v: v.reshape(B, -1, 3)
    dist = lambda p, q: jnp.sqrt(jnp.sum((flat(p)[:, :, None] - flat(q)[:, None, :]) ** 2, -1) + _EPS)
    pred = jax.lax.stop_gradient(pred_BxLx14x3)
    d_pred = dist(pred[:, :, amb], pred[:, :, ref])
    ref_mask = true_mask_BxLx14[:, :, ref].reshape(B, 1, -1)

    def error(x, m):
        w = (m[:, :, amb].reshape(B, -1, 1) & ref_mask).astype(jnp.float32)
        e = jnp.abs(d_pred - dist(x[:, :, amb], true_BxLx14x3[:, :, ref])) * w
        return jnp.sum(e.reshape(B, L, -1), -1)

    use_alt = error(alt, alt_mask) < error(true_BxLx14x3, true_mask_BxLx14)
    return (jnp.where(use_alt[..., None, None], alt, true_BxLx14x3),
            jnp.where(use_alt[..., None], alt_mask, true_mask_BxLx14))


def bond_vectors(atom14_Lx14x3, mask_Lx14, aatype_L) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each atom minus its covalent parent (..., L, 14, 3) and validity (..., L, 14); slot 0 (N,
    the root) and atoms with a missing parent are invalid."""
    aatype = _clean_aatype(aatype_L)
    parent = _table("atom14_parent", aatype)
    vec = atom14_Lx14x3 - _slots(atom14_Lx14x3, parent)
    ok = mask_Lx14 & _slot_mask(mask_Lx14, parent) & (jnp.arange(14) > 0)
    return jnp.where(ok[..., None], vec, 0.0), ok
