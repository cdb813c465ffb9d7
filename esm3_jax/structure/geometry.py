"""Backbone geometry and structure comparison on the host, in numpy.

Frames follow ESM3_SPEC 3.1 exactly (the jnp twin used inside the model is
esm3_jax/model/frames.py; tests check they agree). Comparison metrics: Kabsch superposition and
RMSD, LDDT (CA and all-atom), TM-score (through tmtools' TM-align) and the side-chain metrics of
all-atom predictions.
"""

from __future__ import annotations

import functools

import numpy as np
import tmtools
from scipy.spatial import cKDTree

from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure.rigid_groups import AMINO_ACIDS, UNKNOWN_RESTYPE

# Ideal backbone in a residue's local frame (ESM3_SPEC 3.1; the structure decoder places atoms
# as R @ IDEAL_BACKBONE + t). Rows: N, CA, C.
IDEAL_BACKBONE_3x3 = np.array(
    [[0.5256, 1.3612, 0.0], [0.0, 0.0, 0.0], [-1.5251, 0.0, 0.0]], dtype=np.float32
)
# Same bound as the spec's validity test: anything at or beyond it counts as missing.
MAX_COORDINATE = 1e6
# Carbonyl geometry (Engh & Huber): C=O length and the CA-C-O angle; O lies in the peptide
# plane on the side away from the next residue's N.
C_O_BOND = 1.231
CA_C_O_ANGLE = np.deg2rad(120.5)
# A C(i)-N(i+1) distance beyond this is a chain gap, not a peptide bond (bonded: ~1.33 Å).
MAX_PEPTIDE_BOND = 2.0


def gram_schmidt(x_axis: np.ndarray, xy_plane: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Rotation (..., 3, 3) whose columns are e1 || x_axis, e2 in the (x_axis, xy_plane) plane, e3."""
    e1 = x_axis / np.sqrt(np.sum(x_axis**2, axis=-1, keepdims=True) + eps)
    u = xy_plane - e1 * np.sum(e1 * xy_plane, axis=-1, keepdims=True)
    e2 = u / np.sqrt(np.sum(u**2, axis=-1, keepdims=True) + eps)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=-1)


def backbone_valid(coords_Lx3x3: np.ndarray) -> np.ndarray:
    """(..., L) bool: all 9 N/CA/C numbers finite and below MAX_COORDINATE in magnitude."""
    with np.errstate(invalid="ignore"):
        return (np.abs(coords_Lx3x3[..., :3, :]) < MAX_COORDINATE).all(axis=(-1, -2))


def backbone_frames(coords_Lx3x3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-residue frames from (..., L, 3+, 3) N/CA/C coordinates: (rot ..., L, 3, 3; trans ..., L, 3; mask).

    Origin CA; x along CA - C; N in the +y half of the xy-plane; columns of rot are the axes, so
    rot @ local + trans = global. Residues without a full backbone get the spec's "black-hole"
    frame built from the mean valid N, CA and C (identity at the origin if there are none).
    """
    coords = np.asarray(coords_Lx3x3, np.float32)[..., :3, :]
    mask_L = backbone_valid(coords)
    coords = np.where(mask_L[..., None, None], coords, 0.0)
    n_valid = mask_L.sum(-1).astype(np.float32)[..., None, None]  # (..., 1, 1)
    mean_3x3 = coords.sum(-3) / np.maximum(n_valid, 1.0)  # (..., 3 atoms, 3)
    mean_rot_3x3 = gram_schmidt(mean_3x3[..., 1, :] - mean_3x3[..., 2, :], mean_3x3[..., 0, :] - mean_3x3[..., 1, :])
    mean_rot_3x3 = np.where(n_valid > 0, mean_rot_3x3, np.eye(3, dtype=np.float32))

    n, ca, c = coords[..., 0, :], coords[..., 1, :], coords[..., 2, :]
    rot_Lx3x3 = gram_schmidt(ca - c, n - ca)
    rot_Lx3x3 = np.where(mask_L[..., None, None], rot_Lx3x3, mean_rot_3x3[..., None, :, :])
    trans_Lx3 = np.where(mask_L[..., None], ca, mean_3x3[..., None, 1, :])
    return rot_Lx3x3.astype(np.float32), trans_Lx3.astype(np.float32), mask_L


def ideal_backbone(rot_Lx3x3: np.ndarray, trans_Lx3: np.ndarray) -> np.ndarray:
    """(..., L, 3, 3) N/CA/C placed from frames with the ideal local backbone (the decoder's step)."""
    return np.einsum("...ij,aj->...ai", rot_Lx3x3, IDEAL_BACKBONE_3x3) + trans_Lx3[..., None, :]


def place_oxygen(coords_Lx3x3: np.ndarray) -> np.ndarray:
    """(L, 3) carbonyl O of each residue from its N/CA/C and the next residue's N.

    The carbonyl is planar, so O lies in the CA, C, N(i+1) plane at the ideal C=O length and
    CA-C-O angle. NaN where that plane is undefined: the last residue, a missing atom, or a gap
    (C(i)-N(i+1) > MAX_PEPTIDE_BOND).
    """
    coords = np.asarray(coords_Lx3x3, np.float64)
    ca, c = coords[:, 1], coords[:, 2]
    n_next = np.concatenate([coords[1:, 0], np.full((1, 3), np.nan)])
    # Local frame at C: x towards CA, y towards the next N (orthogonalised).
    rot = gram_schmidt(ca - c, n_next - c)
    local_o = C_O_BOND * np.array([np.cos(CA_C_O_ANGLE), -np.sin(CA_C_O_ANGLE), 0.0])
    o = c + rot @ local_o
    with np.errstate(invalid="ignore"):
        bonded = np.linalg.norm(n_next - c, axis=-1) <= MAX_PEPTIDE_BOND
    return np.where(bonded[:, None], o, np.nan).astype(np.float32)


def with_oxygen(coords_Lx37x3: np.ndarray, *, only_missing: bool = True) -> np.ndarray:
    """atom37 coordinates with O placed from the backbone (where missing, or everywhere)."""
    out = np.array(coords_Lx37x3, np.float32)
    o = place_oxygen(out[:, :3])
    replace = np.isfinite(o).all(-1)
    if only_missing:
        replace &= ~np.isfinite(out[:, rc.O_IDX]).all(-1)
    out[replace, rc.O_IDX] = o[replace]
    return out


# ---------------------------------------------------------------------------------------------
# Superposition and metrics


def kabsch(
    mobile_Nx3: np.ndarray, target_Nx3: np.ndarray, weights_N: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rot 3x3, trans 3) minimising the weighted RMSD of mobile @ rot.T + trans to target.

    Rows with a non-finite coordinate in either set are left out (as is weight 0).
    """
    mobile = np.asarray(mobile_Nx3, np.float64)
    target = np.asarray(target_Nx3, np.float64)
    w = np.ones(len(mobile)) if weights_N is None else np.asarray(weights_N, np.float64)
    w = np.where(np.isfinite(mobile).all(-1) & np.isfinite(target).all(-1), w, 0.0)
    if (w > 0).sum() < 3:
        raise ValueError(f"superposition needs at least 3 shared points, got {int((w > 0).sum())}")
    mobile, target = np.nan_to_num(mobile), np.nan_to_num(target)
    w = w / w.sum()
    mu_m, mu_t = w @ mobile, w @ target
    cov = ((mobile - mu_m) * w[:, None]).T @ (target - mu_t)
    u, _, vt = np.linalg.svd(cov)
    # Flip the last axis if needed so the result is a proper rotation, never a reflection.
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, mu_t - mu_m @ rot.T


def rmsd(mobile_Nx3: np.ndarray, target_Nx3: np.ndarray, *, superpose: bool = True) -> float:
    """RMSD over the points finite in both sets, after optimal superposition unless told not to."""
    mobile = np.asarray(mobile_Nx3, np.float64).reshape(-1, 3)
    target = np.asarray(target_Nx3, np.float64).reshape(-1, 3)
    if superpose:
        rot, trans = kabsch(mobile, target)
        mobile = mobile @ rot.T + trans
    shared = np.isfinite(mobile).all(-1) & np.isfinite(target).all(-1)
    if not shared.any():
        raise ValueError("no point is present in both structures")
    return float(np.sqrt(np.mean(np.sum((mobile[shared] - target[shared]) ** 2, -1))))


def mirror_image(x_Nx3: np.ndarray) -> np.ndarray:
    """The reflection of a structure through the yz-plane (x -> -x): same distances, opposite
    handedness. Which plane does not matter, since the metrics superpose by proper rotations."""
    return np.asarray(x_Nx3) * np.array([-1.0, 1.0, 1.0], np.float32)


def ca_pseudo_torsions(ca_Lx3: np.ndarray) -> np.ndarray:
    """(L - 3,) dihedral angles (degrees, IUPAC sign) of CA(i), CA(i+1), CA(i+2), CA(i+3): about
    +50 in a right-handed alpha helix, -50 in its mirror image; NaN where a CA is missing."""
    ca = np.asarray(ca_Lx3, np.float64)
    b0, b1, b2 = ca[1:-2] - ca[:-3], ca[2:-1] - ca[1:-2], ca[3:] - ca[2:-1]
    n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.cross(b1 / np.linalg.norm(b1, axis=-1, keepdims=True), n1)
    return np.degrees(np.arctan2(np.sum(m * n2, -1), np.sum(n1 * n2, -1)))


def ca_torsion_sign_agreement(pred_ca_Lx3: np.ndarray, true_ca_Lx3: np.ndarray, min_deg: float = 20.0) -> float:
    """Local handedness: the fraction of CA pseudo-torsions with the sign of the truth's, over
    those the truth sets clearly (|angle| within [min_deg, 180 - min_deg]).

    1.0 means the local handedness (helices above all) is right everywhere, ~0 that it is
    mirrored, whatever the global fold. NaN when no torsion qualifies.
    """
    if len(true_ca_Lx3) < 4:
        return float("nan")
    tp, tt = ca_pseudo_torsions(pred_ca_Lx3), ca_pseudo_torsions(true_ca_Lx3)
    with np.errstate(invalid="ignore"):
        clear = np.isfinite(tp) & np.isfinite(tt) & (np.abs(tt) >= min_deg) & (np.abs(tt) <= 180.0 - min_deg)
    return float(np.mean(np.sign(tp[clear]) == np.sign(tt[clear]))) if clear.any() else float("nan")


LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


def lddt(
    pred_LxAx3: np.ndarray,
    true_LxAx3: np.ndarray,
    *,
    cutoff: float = 15.0,
    per_residue: bool = False,
    exclude_intra_residue: bool = True,
) -> float | np.ndarray:
    """Superposition-free LDDT (Mariani et al. 2013) over atoms present in both structures.

    Pairs are the atoms of different residues within `cutoff` Å in the true structure; each
    scores the fraction of thresholds 0.5/1/2/4 Å its distance error stays under. Inputs are
    (L, A, 3) with any atom count A: atom37 for all-atom LDDT, CA only (A=1) for LDDT-CA. The
    global score pools all pairs (as AlphaFold and the ESM reference do); per_residue averages
    over the pairs that involve each residue (NaN for a residue with none).
    `exclude_intra_residue=False` also scores pairs within a residue, which is what the ESM
    reference's flattened all-atom variant does.
    """
    pred = np.asarray(pred_LxAx3, np.float64)
    true = np.asarray(true_LxAx3, np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, true {true.shape}")
    n_res, n_atoms = true.shape[:2]
    present = np.isfinite(pred).all(-1) & np.isfinite(true).all(-1)
    residue_of_atom = np.broadcast_to(np.arange(n_res)[:, None], (n_res, n_atoms))[present]
    true_pts, pred_pts = true[present], pred[present]
    # Neighbour search keeps this O(N * neighbours) instead of materialising N^2 distances.
    pairs = cKDTree(true_pts).query_pairs(cutoff, output_type="ndarray")
    # query_pairs is inclusive at the cutoff; LDDT's inclusion radius is strict.
    d_true = np.linalg.norm(true_pts[pairs[:, 0]] - true_pts[pairs[:, 1]], axis=-1)
    keep = d_true < cutoff
    if exclude_intra_residue:
        keep &= residue_of_atom[pairs[:, 0]] != residue_of_atom[pairs[:, 1]]
    pairs, d_true = pairs[keep], d_true[keep]
    d_pred = np.linalg.norm(pred_pts[pairs[:, 0]] - pred_pts[pairs[:, 1]], axis=-1)
    err = np.abs(d_true - d_pred)
    score = np.mean([err < t for t in LDDT_THRESHOLDS], axis=0)
    if not per_residue:
        return float(score.mean()) if len(score) else float("nan")
    # Each pair counts for both of its atoms' residues, as the reference's symmetric matrix does.
    res_a, res_b = residue_of_atom[pairs[:, 0]], residue_of_atom[pairs[:, 1]]
    total = np.bincount(res_a, score, n_res) + np.bincount(res_b, score, n_res)
    count = np.bincount(res_a, minlength=n_res) + np.bincount(res_b, minlength=n_res)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(np.float32)


def lddt_ca(pred_Lx37x3: np.ndarray, true_Lx37x3: np.ndarray, **kwargs) -> float | np.ndarray:
    """LDDT over CA atoms only (inputs atom37 (L, 37, 3) or CA (L, 3))."""
    pred, true = np.asarray(pred_Lx37x3), np.asarray(true_Lx37x3)
    if pred.ndim == 3:
        pred, true = pred[:, rc.CA_IDX], true[:, rc.CA_IDX]
    return lddt(pred[:, None], true[:, None], **kwargs)


def tm_score(pred_ca_Lx3: np.ndarray, true_ca_Mx3: np.ndarray, pred_seq: str, true_seq: str) -> float:
    """TM-score of a model against the reference, normalised by the reference's length.

    Computed by TM-align (tmtools), which finds its own residue alignment, so the two need not
    correspond residue by residue. Residues with a missing CA are dropped first.
    """
    pred = np.asarray(pred_ca_Lx3, np.float64)
    true = np.asarray(true_ca_Mx3, np.float64)
    keep_p, keep_t = np.isfinite(pred).all(-1), np.isfinite(true).all(-1)
    if keep_p.sum() < 3 or keep_t.sum() < 3:
        raise ValueError("TM-score needs at least 3 residues with a CA in each structure")
    seq_p = "".join(np.array(list(pred_seq))[keep_p])
    seq_t = "".join(np.array(list(true_seq))[keep_t])
    result = tmtools.tm_align(pred[keep_p], true[keep_t], seq_p, seq_t)
    return float(result.tm_norm_chain2)


CHI_ACCURACY_DEGREES = 40.0  # the usual rotamer-recovery tolerance
_LENGTH_BUCKET = 64  # chains are padded to a multiple of this, so few lengths get compiled


@functools.lru_cache(maxsize=1)
def _all_atom_alignment():
    """A jitted (pred37, true37, aatype) -> (pred atom14, true atom14 under the prediction's
    naming, both NaN where either lacks the atom; their torsions)."""
    import jax
    import jax.numpy as jnp

    from esm3_jax.structure import all_atom as AA

    def align(pred37, true37, aat):
        pred14, pred_mask = AA.atom37_to_atom14(pred37, aat)
        true14, true_mask = AA.atom37_to_atom14(true37, aat)
        true14, true_mask = AA.choose_symmetric_naming(pred14, true14, true_mask, aat)
        both = (pred_mask & true_mask)[..., None]
        pred14, true14 = jnp.where(both, pred14, jnp.nan), jnp.where(both, true14, jnp.nan)
        torsions = lambda x14: AA.torsion_angles(AA.atom14_to_atom37(x14, aat, fill=jnp.nan)[0], aat)
        return pred14, true14, torsions(pred14), torsions(true14)

    return jax.jit(align)


def all_atom_comparison(pred_Lx37x3: np.ndarray, true_Lx37x3: np.ndarray, sequence: str) -> dict[str, float]:
    """Heavy-atom agreement of a prediction with the truth (atom37, NaN = absent), residue by residue.

    all_atom_rmsd: RMSD over every atom present in both, after one superposition of them all.
    all_atom_lddt: LDDT over the same atoms (inter-residue pairs, 15 Å).
    sidechain_rmsd_local: atoms beyond N, CA, C, O, each seen from its own residue's backbone
      frame (predicted frame for the prediction, true for the truth): the side-chain error
      left once the backbone's own error is taken out.
    chi1_accuracy, chi2_accuracy: fraction of residues whose chi is within 40° of the truth.
    Symmetric side chains (ASP, GLU, PHE, TYR) are scored under their better naming.
    """
    L = len(sequence)
    P = max(_LENGTH_BUCKET, -(-L // _LENGTH_BUCKET) * _LENGTH_BUCKET)
    pad = lambda x: np.concatenate([np.asarray(x, np.float32), np.full((P - L, rc.NUM_ATOM37, 3), np.nan, np.float32)])[None]
    lookup = {a: i for i, a in enumerate(AMINO_ACIDS)}
    aat = np.full((1, P), UNKNOWN_RESTYPE, np.int32)
    aat[0, :L] = [lookup.get(a, UNKNOWN_RESTYPE) for a in sequence]
    pred14, true14, tors_p, tors_t = _all_atom_alignment()(pad(pred_Lx37x3), pad(true_Lx37x3), aat)
    cut = lambda x: np.asarray(x, np.float64)[0, :L]
    pred, true = cut(pred14), cut(true14)
    out = {"all_atom_rmsd": rmsd(pred.reshape(-1, 3), true.reshape(-1, 3)), "all_atom_lddt": lddt(pred, true)}

    rot_p, trans_p, ok_p = backbone_frames(pred[:, :3])
    rot_t, trans_t, ok_t = backbone_frames(true[:, :3])
    local = lambda x, rot, trans: np.einsum("lji,lkj->lki", rot, x - trans[:, None])  # R^T (x - t)
    side = np.isfinite(pred).all(-1) & (np.arange(14) >= 4) & (ok_p & ok_t)[:, None]
    err = np.linalg.norm(local(pred, rot_p, trans_p) - local(true, rot_t, trans_t), axis=-1)[side]
    out["sidechain_rmsd_local"] = float(np.sqrt(np.mean(err**2))) if len(err) else float("nan")

    angle = lambda sc: np.arctan2(cut(sc)[..., 0], cut(sc)[..., 1])
    wrap = lambda d: np.abs((d + np.pi) % (2 * np.pi) - np.pi)
    to_true = wrap(angle(tors_p["sin_cos"]) - angle(tors_t["sin_cos"]))
    to_alt = wrap(angle(tors_p["sin_cos"]) - angle(tors_t["alt_sin_cos"]))
    diff = np.minimum(to_true, to_alt)
    defined = np.asarray(tors_p["mask"] & tors_t["mask"])[0, :L]
    for k, name in ((3, "chi1_accuracy"), (4, "chi2_accuracy")):
        d = diff[:, k][defined[:, k]]
        out[name] = float(np.mean(d < np.deg2rad(CHI_ACCURACY_DEGREES))) if len(d) else float("nan")
    return out
