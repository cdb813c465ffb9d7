"""One handedness convention across the structure tokenizer's losses, its decoder and its metrics.

On a real chain (BPTI, 58 residues, every heavy atom): each structure loss scores a rigidly moved
copy of the truth ~0, and its mirror image clearly worse wherever the loss can see handedness
(direction, FAPE, aligned error, all-atom direction, torsions; distances cannot). The decoder's
own output frames are the frames the losses build from its atoms. Gradient descent on the chiral
losses from a flat (achiral) start reaches the truth, not its mirror. The evaluation's mirror
metrics call the truth the truth and its mirror the mirror.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from esm3_jax import tokens as T
from esm3_jax.model.frames import backbone_frames
from esm3_jax.model.vqvae import DecoderConfig, StructureDecoder, aa_indices
from esm3_jax.structure import all_atom as AA
from esm3_jax.structure import geometry
from esm3_jax.train.vqvae import loss as VL
from tests.paths import STRUCTURES


def _proper_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return (q * np.sign(np.linalg.det(q))).astype(np.float32)


@pytest.fixture(scope="module")
def bpti():
    from esm3_jax.structure.io import load_chain

    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")
    return load_chain(STRUCTURES / "mdanalysis_mmcif/5PTI.cif.gz", "A")


def _copies(x):
    """(moved, mirrored) copies of coordinates (..., 3): a proper rotation + shift, and a reflection
    that is also moved (so that no loss can score the mirror as 'unmoved')."""
    rot = jnp.asarray(_proper_rotation(0))
    return x @ rot.T + 7.0, (x * jnp.asarray([-1.0, 1.0, 1.0])) @ rot.T - 3.0


def test_every_loss_scores_a_moved_copy_zero_and_the_mirror_worse(bpti):
    true = jnp.asarray(bpti.backbone[None], jnp.float32)
    mask = jnp.isfinite(true).all((-1, -2))
    moved, mirrored = _copies(true)
    noisy = true + 0.1 * jax.random.normal(jax.random.PRNGKey(0), true.shape)

    def backbone_losses(x):
        rot, trans, _ = backbone_frames(x)  # the decoder's frames are these (next test)
        return {
            "distance": float(VL.backbone_distance_loss(x, true, mask, 1e6)),
            "direction": float(VL.backbone_direction_loss(x, true, mask)),
            "fape": float(VL.backbone_fape_loss(rot, trans, x, true, mask)),
            "aligned_error": float(jnp.sqrt(jnp.mean(VL.squared_aligned_error(rot, trans, true, mask)))),
        }

    at_moved, at_mirror, at_noise = backbone_losses(moved), backbone_losses(mirrored), backbone_losses(noisy)
    assert max(at_moved.values()) < 1e-3, at_moved
    # A mirror image has every distance right: only the chiral terms can tell it, and each must
    # score it well beyond 0.1 Å of coordinate noise (measured: direction 4.2 vs 0.23, FAPE 0.75
    # vs 0.17, RMS aligned error 17.7 vs 2.1 Å; frames from noisy atoms turn fast).
    assert at_mirror["distance"] < 1e-3
    for chiral in ("direction", "fape", "aligned_error"):
        assert at_mirror[chiral] > 3 * at_noise[chiral] > 0, (chiral, at_mirror, at_noise)

    # All-atom terms (atom14): distance, direction and the torsion-angle loss.
    aa = jnp.asarray(aa_indices(bpti.sequence)[None])
    atom37 = jnp.asarray(bpti.coords[None], jnp.float32)
    true14, mask14 = AA.atom37_to_atom14(atom37, aa)
    moved37, mirrored37 = _copies(atom37)

    def all_atom_losses(x37):
        x14, _ = AA.atom37_to_atom14(x37, aa)
        tors = AA.torsion_angles(x37, aa)
        truth = AA.torsion_angles(atom37, aa)
        torsion, _ = VL.torsion_loss(tors["sin_cos"], truth["sin_cos"], truth["alt_sin_cos"], truth["mask"], mask)
        return {
            "all_atom_distance": float(VL.all_atom_distance_loss(x14, true14, mask14, 1e6)),
            "all_atom_direction": float(VL.all_atom_direction_loss(x14, true14, mask14, aa)),
            "torsion": float(torsion),
        }

    at_moved, at_mirror = all_atom_losses(moved37), all_atom_losses(mirrored37)
    assert max(at_moved.values()) < 1e-3, at_moved
    assert at_mirror["all_atom_distance"] < 1e-3
    # Every torsion changes sign under reflection: sin flips, so the squared (sin, cos) error of
    # an angle a against -a is 4 sin^2 a, about 2 on average.
    assert at_mirror["all_atom_direction"] > 1.0 and at_mirror["torsion"] > 1.0, at_mirror


def test_decoder_output_frames_are_the_frames_of_its_own_atoms(bpti):
    """Checked on a whole decoder's output (all-atom, sequence-conditioned), not hand-made frames:
    the frames the decoder returns (and FAPE / pAE use) are the frames both frame builders (jnp
    in the model, numpy in the metrics) make from its backbone; its all-atom output reads back the
    torsions it was built from; FAPE of its output against itself is 0 and against its own mirror
    image is not."""
    L = 40
    cfg = DecoderConfig(d_model=64, n_heads=4, n_layers=2, sequence_conditioning=True, all_atom=True)
    tokens = np.array([T.encode_structure_tokens(np.random.default_rng(0).integers(0, 64, L))], np.int32)
    aa = np.concatenate([[20], aa_indices(bpti.sequence[:L]), [20]])[None].astype(np.int32)
    model = StructureDecoder(cfg)
    params = nn.unbox(jax.jit(lambda k: model.init(k, tokens, sequence_BxL=aa))(jax.random.PRNGKey(0)))
    out = jax.jit(model.apply)(params, tokens, sequence_BxL=aa)
    bb = out["backbone"]

    rot, trans, ok = backbone_frames(bb)
    assert bool(ok.all())
    np.testing.assert_allclose(np.asarray(rot), np.asarray(out["rot"]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(trans), np.asarray(out["trans"]), atol=1e-4)
    rot_np, trans_np, _ = geometry.backbone_frames(np.asarray(bb[0]))
    np.testing.assert_allclose(rot_np, np.asarray(out["rot"][0]), atol=1e-4)
    np.testing.assert_allclose(np.linalg.det(rot_np), 1.0, atol=1e-4)  # proper rotations only
    np.testing.assert_allclose(geometry.ideal_backbone(rot_np, trans_np), np.asarray(bb[0]), atol=1e-4)

    # The all-atom builder hangs side chains on the same frames: its N/CA/C are the backbone's
    # (to the 0.06 Å by which AlphaFold's per-residue ideal geometry differs from ESM's), and the
    # torsions read back from its atoms are the ones the decoder predicted.
    atom37, m37 = np.asarray(out["atom37"])[0, 1:-1], np.asarray(out["atom37_mask"])[0, 1:-1]
    assert np.abs(atom37[:, :3] - np.asarray(bb)[0, 1:-1]).max() < 0.06
    back = AA.torsion_angles(jnp.asarray(np.where(m37[..., None], atom37, np.nan))[None], aa[:, 1:-1])
    predicted = AA.normalize_torsions(out["torsions"])[:, 1:-1]
    chis = np.asarray(back["mask"])[0, :, 3:]
    assert chis.sum() > 20
    np.testing.assert_allclose(np.asarray(back["sin_cos"])[0, :, 3:][chis], np.asarray(predicted)[0, :, 3:][chis], atol=1e-4)

    mask = jnp.ones(bb.shape[:2], bool)
    assert float(VL.backbone_fape_loss(out["rot"], out["trans"], bb, bb, mask)) < 1e-4
    assert float(VL.backbone_fape_loss(out["rot"], out["trans"], bb, bb * jnp.asarray([-1.0, 1.0, 1.0]), mask)) > 0.1


@pytest.mark.parametrize("losses", [("direction",), ("fape",)])
def test_chiral_losses_pull_a_flat_start_to_the_truth_not_its_mirror(bpti, losses):
    """A flattened copy of the truth (z = 0, plus 0.05 Å of noise) is as close to the truth as to
    its mirror image; descending a chiral loss (frames from the moving atoms, as the decoder's
    are) must end nearer the truth. A convention mismatch between the two sides (rows vs columns,
    the inverse on the wrong side, the cross product's order) would end nearer the mirror."""
    true = jnp.asarray(bpti.backbone[None], jnp.float32)
    mask = jnp.isfinite(true).all((-1, -2))
    centred = true - jnp.mean(true[:, :, 1], axis=1, keepdims=True)[:, :, None]
    flat = centred * jnp.asarray([1.0, 1.0, 0.0]) + 0.05 * jax.random.normal(jax.random.PRNGKey(1), true.shape)

    def loss(x):
        rot, trans, _ = backbone_frames(x)
        terms = {
            "distance": VL.backbone_distance_loss(x, true, mask, 1e6) / 10.0,
            "direction": VL.backbone_direction_loss(x, true, mask),
            "fape": 10.0 * VL.backbone_fape_loss(rot, trans, x, true, mask),
        }
        return sum(terms[k] for k in losses)

    tx = optax.adam(0.05)

    @jax.jit
    def descend(x):
        def step(carry, _):
            x, opt = carry
            g = jax.grad(loss)(x)
            upd, opt = tx.update(g, opt)
            return (optax.apply_updates(x, upd), opt), None

        (x, _), _ = jax.lax.scan(step, (x, tx.init(x)), None, length=150)
        return x

    end = np.asarray(descend(flat))[0].reshape(-1, 3)
    truth = np.asarray(true)[0].reshape(-1, 3)
    to_truth, to_mirror = geometry.rmsd(end, truth), geometry.rmsd(end, geometry.mirror_image(truth))
    start = np.asarray(flat)[0].reshape(-1, 3)
    assert abs(geometry.rmsd(start, truth) - geometry.rmsd(start, geometry.mirror_image(truth))) < 0.05
    assert to_truth < to_mirror - 1.0, (losses, to_truth, to_mirror)


def test_mirror_metrics(bpti):
    """The evaluation's mirror RMSD and local-handedness score: the truth is the truth, its mirror
    the mirror, and an alpha helix has positive CA pseudo-torsions (right-handed)."""
    ca = bpti.backbone[:, 1]
    moved = ca @ _proper_rotation(2).T + 4.0
    mirror = geometry.mirror_image(ca) @ _proper_rotation(3).T
    assert geometry.rmsd(moved, ca) < 1e-3 and geometry.rmsd(moved, geometry.mirror_image(ca)) > 3.0
    assert geometry.rmsd(mirror, geometry.mirror_image(ca)) < 1e-3 and geometry.rmsd(mirror, ca) > 3.0
    assert geometry.ca_torsion_sign_agreement(moved, ca) == 1.0
    assert geometry.ca_torsion_sign_agreement(mirror, ca) == 0.0
    # An ideal right-handed alpha helix: 100 deg per residue, 1.5 Å rise, radius 2.3 Å.
    k = np.arange(12)
    helix = np.stack([2.3 * np.cos(np.radians(100 * k)), 2.3 * np.sin(np.radians(100 * k)), 1.5 * k], -1)
    np.testing.assert_allclose(geometry.ca_pseudo_torsions(helix), 50.0, atol=5.0)
    np.testing.assert_allclose(geometry.ca_pseudo_torsions(geometry.mirror_image(helix)), -50.0, atol=5.0)
