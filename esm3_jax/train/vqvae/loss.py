"""VQ-VAE structure losses and metrics (ESM3_SPEC 5.4). All work on unframed residues: arrays
(B, L, ...) with a mask (B, L) of residues that have true N/CA/C coordinates.

Stage 1: backbone distance and direction losses (clamped squared errors), binned distance and
direction classification, inverse folding, plus the codebook's commitment loss.
Stage 2 adds the confidence heads' losses: binned per-residue LDDT-CA (pLDDT) and binned aligned
error (pAE); and for all-atom decoders the distance and direction losses over atom14 (every heavy
atom) and AlphaFold 2's torsion-angle loss.
structure_losses assembles a batch's weighted losses (their sum is "total") from the settings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from esm3_jax.model.frames import gram_schmidt
from esm3_jax.model.structure_heads import MAX_PAE_BIN, N_DIRECTION_BINS, N_DISTOGRAM_BINS, N_PLDDT_BINS
from esm3_jax.structure.all_atom import atom37_to_atom14, bond_vectors, choose_symmetric_naming, normalize_torsions, torsion_angles
from esm3_jax.train.vqvae.config import DIRECTION_CLAMP, DISTANCE_CLAMP, VQVAETrainSettings

DISTOGRAM_EDGES = np.linspace(2.3125, 21.6875, N_DISTOGRAM_BINS - 1, dtype=np.float32)  # Å, AF2's
LDDT_CUTOFF = 15.0
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


def masked_mean(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    w = mask.astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _cross_entropy(logits: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]


def _zero_missing(x_BxLx3x3, mask_BxL):
    return jnp.where(mask_BxL[..., None, None], jnp.nan_to_num(x_BxLx3x3), 0.0)


def backbone_distance_loss(pred_BxLx3x3, true_BxLx3x3, mask_BxL, clamp: float = DISTANCE_CLAMP):
    """Clamped squared error between all-pairs distance matrices of the 3L backbone atoms."""
    B, L = mask_BxL.shape
    p = pred_BxLx3x3.reshape(B, 3 * L, 3)
    t = _zero_missing(true_BxLx3x3, mask_BxL).reshape(B, 3 * L, 3)
    m = jnp.repeat(mask_BxL, 3, axis=1)
    dist = lambda x: jnp.sqrt(jnp.sum((x[:, :, None] - x[:, None, :]) ** 2, -1) + 1e-8)
    err = jnp.minimum((dist(p) - dist(t)) ** 2, clamp)
    return masked_mean(err, m[:, :, None] & m[:, None, :])


def backbone_vectors(x_BxLx3x3, mask_BxL):
    """Six vectors per residue and their mask: N->CA, CA->C, C->N(i+1), and the cross products
    n1 = (N->CA) x (CA->C), n2 = (CA->C) x (C->N+), n3 = (C->N+) x (N+->CA+). Valid where the
    residue and the next are both present."""
    x = _zero_missing(x_BxLx3x3, mask_BxL)
    n, ca, c = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    n_next = jnp.concatenate([n[:, 1:], n[:, -1:]], axis=1)
    ca_next = jnp.concatenate([ca[:, 1:], ca[:, -1:]], axis=1)
    v1, v2, v3 = ca - n, c - ca, n_next - c
    v1_next = ca_next - n_next
    vecs = jnp.stack([v1, v2, v3, jnp.cross(v1, v2), jnp.cross(v2, v3), jnp.cross(v3, v1_next)], axis=2)
    ok = mask_BxL & jnp.concatenate([mask_BxL[:, 1:], jnp.zeros_like(mask_BxL[:, :1])], axis=1)
    return vecs, ok  # (B, L, 6, 3), (B, L)


def backbone_direction_loss(pred_BxLx3x3, true_BxLx3x3, mask_BxL, clamp: float = DIRECTION_CLAMP):
    """Clamped squared error between the Gram matrices of all 6L backbone vectors.

    Dots between different vector kinds (e.g. a normal with a bond) are triple products, which
    change sign under reflection: the loss also pins the chirality, unlike distances.
    """
    B, L = mask_BxL.shape
    vp, ok = backbone_vectors(pred_BxLx3x3, mask_BxL)
    vt, _ = backbone_vectors(true_BxLx3x3, mask_BxL)
    gram = lambda v: jnp.einsum("bic,bjc->bij", v.reshape(B, 6 * L, 3), v.reshape(B, 6 * L, 3))
    err = jnp.minimum((gram(vp) - gram(vt)) ** 2, clamp)
    m = jnp.repeat(ok, 6, axis=1)
    return masked_mean(err, m[:, :, None] & m[:, None, :])


def virtual_cb(x_BxLx3x3):
    """Idealised C-beta from N, CA, C (AlphaFold's constants)."""
    n, ca, c = x_BxLx3x3[..., 0, :], x_BxLx3x3[..., 1, :], x_BxLx3x3[..., 2, :]
    b, cc = ca - n, c - ca
    a = jnp.cross(b, cc)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca


def distogram_loss(logits_BxLxLx64, true_BxLx3x3, mask_BxL):
    cb = virtual_cb(_zero_missing(true_BxLx3x3, mask_BxL))
    d = jnp.sqrt(jnp.sum((cb[:, :, None] - cb[:, None, :]) ** 2, -1))
    target = jnp.sum(d[..., None] > jnp.asarray(DISTOGRAM_EDGES), axis=-1)
    return masked_mean(_cross_entropy(logits_BxLxLx64, target), mask_BxL[:, :, None] & mask_BxL[:, None, :])


def direction_classification_loss(logits_BxLxLx96, true_BxLx3x3, mask_BxL):
    """CE over 16 uniform bins of cos(angle) between residue i's and j's vector of each kind."""
    vt, ok = backbone_vectors(true_BxLx3x3, mask_BxL)
    unit = vt / (jnp.linalg.norm(vt, axis=-1, keepdims=True) + 1e-6)
    cos_BxLxLx6 = jnp.einsum("bikc,bjkc->bijk", unit, unit)
    target = jnp.clip(jnp.floor((cos_BxLxLx6 + 1.0) / 2.0 * N_DIRECTION_BINS), 0, N_DIRECTION_BINS - 1).astype(jnp.int32)
    logits = logits_BxLxLx96.reshape(*logits_BxLxLx96.shape[:3], 6, N_DIRECTION_BINS)
    pair = (ok[:, :, None] & ok[:, None, :])[..., None]
    return masked_mean(_cross_entropy(logits, target), jnp.broadcast_to(pair, target.shape))


def inverse_folding_loss(logits_BxLx20, aa_BxL, mask_BxL):
    known = mask_BxL & (aa_BxL < logits_BxLx20.shape[-1])
    target = jnp.where(known, aa_BxL, 0)
    return masked_mean(_cross_entropy(logits_BxLx20, target), known)


def lddt_ca(pred_BxLx3, true_BxLx3, mask_BxL) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-residue LDDT-CA (B, L) and per-chain LDDT-CA (B,); inclusion radius 15 Å on the truth."""
    dist = lambda x: jnp.sqrt(jnp.sum((x[:, :, None] - x[:, None, :]) ** 2, -1) + 1e-10)
    t = jnp.where(mask_BxL[..., None], jnp.nan_to_num(true_BxLx3), 0.0)
    dt, dp = dist(t), dist(pred_BxLx3)
    L = mask_BxL.shape[1]
    pair = mask_BxL[:, :, None] & mask_BxL[:, None, :] & (dt < LDDT_CUTOFF) & ~jnp.eye(L, dtype=bool)[None]
    err = jnp.abs(dt - dp)
    score = sum((err < th).astype(jnp.float32) for th in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    w = pair.astype(jnp.float32)
    per_res = jnp.sum(score * w, -1) / jnp.maximum(jnp.sum(w, -1), 1.0)
    per_chain = jnp.sum(score * w, (-1, -2)) / jnp.maximum(jnp.sum(w, (-1, -2)), 1.0)
    return per_res, per_chain


def plddt_loss(logits_BxLx50, pred_BxLx3x3, true_BxLx3x3, mask_BxL):
    per_res, _ = lddt_ca(jax.lax.stop_gradient(pred_BxLx3x3[:, :, 1]), true_BxLx3x3[:, :, 1], mask_BxL)
    target = jnp.clip(jnp.floor(per_res * N_PLDDT_BINS), 0, N_PLDDT_BINS - 1).astype(jnp.int32)
    return masked_mean(_cross_entropy(logits_BxLx50, target), mask_BxL)


def _frames_from_backbone(x_BxLx3x3):
    n, ca, c = x_BxLx3x3[..., 0, :], x_BxLx3x3[..., 1, :], x_BxLx3x3[..., 2, :]
    return gram_schmidt(ca - c, n - ca), ca


def _points_in_frames(rot_BxLx3x3, trans_BxLx3, x_BxNx3):
    """(B, L, N, 3): point n in residue l's local frame, R_l^T (x_n - t_l)."""
    return jnp.einsum("bimn,bijm->bijn", rot_BxLx3x3, x_BxNx3[:, None] - trans_BxLx3[:, :, None])


def backbone_fape_loss(pred_rot, pred_trans, pred_BxLx3x3, true_BxLx3x3, mask_BxL, clamp: float = 10.0):
    """Frame-aligned point error (AlphaFold 2) over N/CA/C: every backbone atom j seen from every
    residue i's frame, pred vs true, the distance clamped at `clamp` Å and divided by 10 Å.

    Not one of the paper's stage-1 losses (an addition, off by default). Distances are blind to
    a mirror image and the direction loss pins chirality only weakly, so a decoder trained on
    them folds a share of chains as their mirror image; frames are proper rotations, so FAPE is not.
    Clamped, it has no gradient for pairs off by more than `clamp`: early in training that is
    every non-local pair, so the global fold's handedness is left to the other losses.
    """
    true = _zero_missing(true_BxLx3x3, mask_BxL)
    true_rot, true_trans = _frames_from_backbone(true)
    B, L = mask_BxL.shape
    # (B, L_i, 3 L_j, 3): every backbone atom in every residue's frame.
    pred_local = _points_in_frames(pred_rot, pred_trans, pred_BxLx3x3.reshape(B, 3 * L, 3))
    true_local = _points_in_frames(true_rot, true_trans, true.reshape(B, 3 * L, 3))
    err = jnp.sqrt(jnp.sum((pred_local - true_local) ** 2, -1) + 1e-8).reshape(B, L, L, 3)
    pair = mask_BxL[:, :, None, None] & mask_BxL[:, None, :, None]
    return masked_mean(jnp.minimum(err, clamp), jnp.broadcast_to(pair, err.shape)) / 10.0


def squared_aligned_error(pred_rot, pred_trans, true_BxLx3x3, mask_BxL):
    """(B, L, L) squared aligned error (Å^2): residue j's CA seen from residue i's frame, the
    prediction's (its own rot, trans) against the truth's (frames from its backbone). The pAE
    head's target; no gradient reaches the prediction."""
    true_rot, true_trans = _frames_from_backbone(_zero_missing(true_BxLx3x3, mask_BxL))
    local = lambda rot, t: _points_in_frames(rot, t, t)
    pred_local = local(jax.lax.stop_gradient(pred_rot), jax.lax.stop_gradient(pred_trans))
    return jnp.sum((pred_local - local(true_rot, true_trans)) ** 2, -1)


def pae_loss(logits_BxLxLx64, pred_rot, pred_trans, true_BxLx3x3, mask_BxL):
    """CE on the binned aligned error (squared_aligned_error)."""
    sq = squared_aligned_error(pred_rot, pred_trans, true_BxLx3x3, mask_BxL)
    sq_edges = jnp.linspace(0.0, MAX_PAE_BIN, logits_BxLxLx64.shape[-1] - 1) ** 2
    target = jnp.sum(sq[..., None] > sq_edges, axis=-1)
    return masked_mean(_cross_entropy(logits_BxLxLx64, target), mask_BxL[:, :, None] & mask_BxL[:, None, :])


# --- stage 2, all-atom ----------------------------------------------------------------------------

# All-pairs losses over atom14 hold (14 L)^2 values per chain (51M at L = 512): they are summed
# over blocks of this many rows, each recomputed in the backward pass, so memory grows with
# PAIR_BLOCK * 14 L instead.
PAIR_BLOCK = 1024


def _blockwise_clamped_pair_error(pred_BxNx3, true_BxNx3, mask_BxN, pair_fn, clamp: float, block: int = PAIR_BLOCK):
    """Masked mean over all point pairs (i, j) of min((f(p_i, p_j) - f(t_i, t_j))^2, clamp)."""
    B, N, _ = pred_BxNx3.shape
    n_blocks = -(-N // block)
    pad = n_blocks * block - N
    rows = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(B, n_blocks, block, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_block(args):
        p_i, t_i, m_i = args
        err = jnp.minimum((pair_fn(p_i, pred_BxNx3) - pair_fn(t_i, true_BxNx3)) ** 2, clamp)
        w = m_i[:, :, None] & mask_BxN[:, None, :]
        return jnp.sum(jnp.where(w, err, 0.0)), jnp.sum(w.astype(jnp.float32))

    sums, counts = jax.lax.map(one_block, (rows(pred_BxNx3), rows(true_BxNx3), rows(mask_BxN)))
    return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)


def _pair_distance(a_BxIx3, b_BxJx3):
    return jnp.sqrt(jnp.sum((a_BxIx3[:, :, None] - b_BxJx3[:, None, :]) ** 2, -1) + 1e-8)


def _pair_dot(a_BxIx3, b_BxJx3):
    return jnp.einsum("bic,bjc->bij", a_BxIx3, b_BxJx3)


def all_atom_distance_loss(pred_BxLx14x3, true_BxLx14x3, mask_BxLx14, clamp: float = DISTANCE_CLAMP):
    """The backbone distance loss over every heavy atom: clamped squared error between the
    all-pairs distance matrices of the 14L atom14 slots, over pairs of atoms present in the truth."""
    B = pred_BxLx14x3.shape[0]
    flat = lambda x: x.reshape(B, -1, 3)
    true = jnp.where(mask_BxLx14[..., None], true_BxLx14x3, 0.0)
    return _blockwise_clamped_pair_error(flat(pred_BxLx14x3), flat(true), mask_BxLx14.reshape(B, -1), _pair_distance, clamp)


def atom14_vectors(x_BxLx14x3, mask_BxLx14, aatype_BxL):
    """The 6 backbone vectors of `backbone_vectors` plus one bond vector per further heavy atom
    (O, CB, the side chain: atom minus its covalent parent): (B, L, 17, 3) and validity (B, L, 17)."""
    bb_mask = jnp.all(mask_BxLx14[..., :3], -1)
    bb, bb_ok = backbone_vectors(x_BxLx14x3[..., :3, :], bb_mask)
    bonds, bond_ok = bond_vectors(x_BxLx14x3, mask_BxLx14, aatype_BxL)
    vecs = jnp.concatenate([bb, bonds[..., 3:, :]], axis=-2)
    ok = jnp.concatenate([jnp.broadcast_to(bb_ok[..., None], bb.shape[:-1]), bond_ok[..., 3:]], axis=-1)
    return vecs, ok


def all_atom_direction_loss(pred_BxLx14x3, true_BxLx14x3, mask_BxLx14, aatype_BxL, clamp: float = DIRECTION_CLAMP):
    """The backbone direction loss over every heavy atom: clamped squared error between the Gram
    matrices of all residues' backbone and bond vectors (`atom14_vectors`). Validity comes from the
    truth's atoms; the prediction has every atom its residue type has."""
    B = pred_BxLx14x3.shape[0]
    true = jnp.where(mask_BxLx14[..., None], true_BxLx14x3, 0.0)
    vt, ok = atom14_vectors(true, mask_BxLx14, aatype_BxL)
    vp, _ = atom14_vectors(pred_BxLx14x3, mask_BxLx14, aatype_BxL)
    flat = lambda x: x.reshape(B, -1, 3)
    return _blockwise_clamped_pair_error(flat(vp), flat(vt), ok.reshape(B, -1), _pair_dot, clamp)


def torsion_loss(pred_BxLx7x2, true_BxLx7x2, alt_BxLx7x2, mask_BxLx7, residue_mask_BxL):
    """(AlphaFold 2's torsion loss, its unit-norm penalty).

    The loss is the squared distance between the normalised predicted (sin, cos) and the true
    one, or the alternative for pi-periodic chis if that is closer, averaged over the torsions
    the truth defines. The penalty, | |raw pair| - 1 | over every torsion of every residue with
    structure, keeps the raw pairs near the unit circle so that normalising them stays well
    conditioned.
    """
    unit = normalize_torsions(pred_BxLx7x2)
    sq = jnp.minimum(jnp.sum((unit - true_BxLx7x2) ** 2, -1), jnp.sum((unit - alt_BxLx7x2) ** 2, -1))
    norm = jnp.sqrt(jnp.sum(pred_BxLx7x2.astype(jnp.float32) ** 2, -1) + 1e-8)
    penalty_mask = jnp.broadcast_to(residue_mask_BxL[..., None], mask_BxLx7.shape)
    return masked_mean(sq, mask_BxLx7), masked_mean(jnp.abs(norm - 1.0), penalty_mask)


def structure_losses(out: dict, batch: dict, t: VQVAETrainSettings) -> dict[str, jnp.ndarray]:
    """The weighted losses of one batch and their sum ("total"). A loss whose weight is 0 is not
    computed at all: the pairwise head's logits then drop out of the compiled step, which is
    most of a small decoder's cost (configs/vqvae_overfit.yaml turns the binned losses off)."""
    true, mask, weights = batch["coords"], batch["has_structure"], t.loss_weights
    pred = out["backbone"]
    losses = {}
    if weights.distance:
        losses["distance"] = backbone_distance_loss(pred, true, mask, t.distance_clamp)
    if weights.direction:
        losses["direction"] = backbone_direction_loss(pred, true, mask, t.direction_clamp)
    if weights.distogram:
        losses["distogram"] = distogram_loss(out["distogram_logits"], true, mask)
    if weights.direction_bins:
        losses["direction_bins"] = direction_classification_loss(out["direction_logits"], true, mask)
    if "sequence_logits" in out:
        losses["inverse_folding"] = inverse_folding_loss(out["sequence_logits"], batch["aa"], mask)
    if "commitment" in out:
        losses["commitment"] = out["commitment"]
    if weights.fape:
        losses["fape"] = backbone_fape_loss(out["rot"], out["trans"], pred, true, mask, t.fape_clamp)
    if weights.plddt:
        losses["plddt"] = plddt_loss(out["plddt_logits"], pred, true, mask)
    if weights.pae:
        losses["pae"] = pae_loss(out["pae_logits"], out["rot"], out["trans"], true, mask)
    if "atom14" in out:
        losses.update(all_atom_losses(out, batch, t))
    losses["total"] = sum(getattr(weights, k) * v for k, v in losses.items())
    return losses


def all_atom_losses(out: dict, batch: dict, t: VQVAETrainSettings) -> dict[str, jnp.ndarray]:
    """Stage-2 losses of an all-atom decoder against the batch's atom37, each when its weight is on.

    Symmetric side chains (ASP, GLU, PHE, TYR) are compared under the naming closest to the
    prediction, and the torsion loss takes the closer of a pi-periodic chi's two angles.
    """
    w, aa, has = t.loss_weights, batch["aa"], batch["has_structure"]
    losses = {}
    if w.all_atom_distance or w.all_atom_direction:
        true14, mask14 = atom37_to_atom14(batch["atom37"], aa)
        true14, mask14 = choose_symmetric_naming(out["atom14"], true14, mask14 & has[..., None], aa)
        if w.all_atom_distance:
            losses["all_atom_distance"] = all_atom_distance_loss(out["atom14"], true14, mask14, t.distance_clamp)
        if w.all_atom_direction:
            losses["all_atom_direction"] = all_atom_direction_loss(out["atom14"], true14, mask14, aa, t.direction_clamp)
    if w.torsion or w.torsion_norm:
        tors = torsion_angles(batch["atom37"], aa)
        losses["torsion"], losses["torsion_norm"] = torsion_loss(
            out["torsions"], tors["sin_cos"], tors["alt_sin_cos"], tors["mask"] & has[..., None], has)
    return losses
