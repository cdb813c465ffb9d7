"""Stage 2 of the structure tokenizer: the all-atom decoder output, the all-atom and torsion
losses, ESM3-predicted token augmentation (with a tiny random ESM3) and all-atom decoding from
the CLI. Tiny models on real chains."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from esm3_jax.model.vqvae import AMINO_ACIDS, N_AMINO_ACIDS, DecoderConfig, StructureDecoder
from esm3_jax.structure import all_atom as AA
from esm3_jax.structure import rigid_groups as G
from esm3_jax.train.vqvae import loss as VL

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ROOT / ".." / "shared" / "data" / "structures"
SMALL_STAGE2 = ROOT / "configs" / "vqvae_small_stage2.yaml"
TINY = [
    "decoder.d_model=32", "decoder.n_heads=2", "decoder.n_layers=1", "train.batch_size=2", "train.crop_length=40",
    "train.max_train_chains=3", "train.max_valid_chains=2", "train.eval_max_length=64", "train.log_every=1",
    "train.decoder_init=",  # configs/vqvae_small_stage2.yaml starts from a stage-1 run's decoder; these tests start fresh
]
ENCODER = ["encoder.d_model=32", "encoder.v_heads=4", "encoder.d_out=8", "encoder.n_codes=32"]


def _need_data():
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A stage-1 encoder (codebook fitted to its outputs on real chains), untrained otherwise."""
    from esm3_jax.train.vqvae.config import load_vqvae_config
    from esm3_jax.train.vqvae.data import batches, load_split
    from esm3_jax.train.vqvae.stages import Stage1, _has_structure

    _need_data()
    cfg = load_vqvae_config(ROOT / "configs" / "vqvae_small.yaml", ENCODER + TINY)
    chains = load_split(STRUCTURES, "train", 3)
    trainer = Stage1(cfg)
    state = trainer.init(_has_structure(next(batches(chains, 2, 40, 0))), jax.random.PRNGKey(0))
    out = tmp_path_factory.mktemp("stage1")
    enc_dir, _ = trainer.export(state, out)
    return enc_dir


@pytest.fixture(scope="module")
def esm3_dir(tmp_path_factory):
    """A randomly initialised ESM3 of configs/tiny.yaml's size, saved as an esm3-jax checkpoint."""
    from esm3_jax.config import to_dict
    from esm3_jax.train.config import load_config
    from esm3_jax.model.esm3 import init_params
    from esm3_jax.compat.params_io import save_params

    cfg = load_config(ROOT / "configs" / "tiny.yaml").model
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(3)))
    return save_params(tmp_path_factory.mktemp("esm3") / "tiny", params, to_dict(cfg), "esm3")


def _stage2_cfg(encoder_dir, *extra):
    from esm3_jax.train.vqvae.config import load_vqvae_config

    return load_vqvae_config(SMALL_STAGE2, TINY + [f"train.encoder_checkpoint={encoder_dir}", *extra])


def _batch(n_chains=4, length=30, seed=0):
    from esm3_jax.train.vqvae.data import crop, load_split, pad_chains
    from esm3_jax.train.vqvae.stages import _has_structure

    _need_data()
    chains = load_split(STRUCTURES, "valid", n_chains, all_atom=True)
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(v) for k, v in _has_structure(pad_chains([crop(c, length, rng) for c in chains], length)).items()}


def test_all_atom_decoder_builds_atoms_from_its_frames_and_torsions():
    cfg = DecoderConfig(d_model=32, n_heads=2, n_layers=1, sequence_conditioning=True, all_atom=True)
    seq = "MKWDGAYF"
    aa = np.array([[N_AMINO_ACIDS] + [AMINO_ACIDS.index(a) for a in seq] + [N_AMINO_ACIDS]], np.int32)
    tokens = np.array([T.encode_structure_tokens(np.arange(len(seq)) * 3)], np.int32)
    model = StructureDecoder(cfg)
    params = nn.unbox(jax.jit(lambda k: model.init(k, tokens, sequence_BxL=aa))(jax.random.PRNGKey(0)))
    out = jax.jit(model.apply)(params, tokens, sequence_BxL=aa)
    x14, m14 = AA.atom14_from_frames(out["rot"], out["trans"], aa, out["torsions"])
    np.testing.assert_allclose(np.asarray(out["atom14"]), np.asarray(x14), atol=1e-5)
    # Per residue type, exactly its heavy atoms; BOS/EOS positions only a bare backbone.
    counts = np.asarray(out["atom37_mask"]).sum(-1)[0]
    assert counts.tolist() == [4] + [len(G.IDEAL_RESIDUES[G.RESTYPE_NAMES[AMINO_ACIDS.index(a)]].atoms) for a in seq] + [4]
    # CA sits at the frame's origin; N and C agree with the backbone head's ideal atoms.
    atom37 = np.asarray(out["atom37"])[0]
    np.testing.assert_allclose(atom37[:, 1], np.asarray(out["trans"])[0], atol=1e-4)
    assert np.abs(atom37[:, [0, 2]] - np.asarray(out["backbone"])[0, :, [0, 2]].transpose(1, 0, 2)).max() < 0.06
    with pytest.raises(ValueError, match="sequence_conditioning"):
        DecoderConfig(all_atom=True).validate()


def test_all_atom_losses():
    rng = np.random.default_rng(0)
    B, L = 2, 10
    aa = jnp.asarray(rng.integers(0, 21, (B, L)))
    rot = jnp.asarray(np.linalg.qr(rng.normal(size=(B, L, 3, 3)))[0])
    trans = jnp.asarray(np.cumsum(rng.normal(size=(B, L, 3)) * 2.2, axis=1))
    tors = jnp.asarray(rng.normal(size=(B, L, 7, 2)))
    true14, mask = AA.atom14_from_frames(rot, trans, aa, tors)
    mask = mask.at[0, 3, 5:].set(False).at[1, 7].set(False)  # missing side chain atoms, a missing residue
    moved = true14 + jnp.asarray(rng.normal(size=true14.shape) * 0.7)

    dist = VL.all_atom_distance_loss(moved, true14, mask)
    assert float(VL.all_atom_distance_loss(true14, true14, mask)) < 1e-6 and float(dist) > 0.1
    # Blockwise summation is the plain all-pairs mean.
    assert float(VL._blockwise_clamped_pair_error(moved.reshape(B, -1, 3), true14.reshape(B, -1, 3), mask.reshape(B, -1),
                                                  VL._pair_distance, VL.DISTANCE_CLAMP, block=7)) == pytest.approx(float(dist), rel=1e-5)
    # Atoms missing in the truth do not count, whatever the prediction puts there.
    elsewhere = moved.at[0, 3, 5:].add(50.0).at[1, 7].add(50.0)
    assert float(VL.all_atom_distance_loss(elsewhere, true14, mask)) == pytest.approx(float(dist), rel=1e-5)
    assert float(VL.all_atom_distance_loss(moved * 30.0, true14, mask)) <= VL.DISTANCE_CLAMP

    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    q = jnp.asarray(q * np.sign(np.linalg.det(q)))  # a proper rotation (det -q = -det q)
    rotated = true14 @ q.T + 5.0
    assert float(VL.all_atom_direction_loss(rotated, true14, mask, aa)) < 1e-4
    assert float(VL.all_atom_direction_loss(moved, true14, mask, aa)) > 0.1
    # Mirror images have the same distances but not the same directions (triple products).
    mirrored = true14 * jnp.asarray([1.0, 1.0, -1.0])
    assert float(VL.all_atom_distance_loss(mirrored, true14, mask)) < 1e-6
    assert float(VL.all_atom_direction_loss(mirrored, true14, mask, aa)) > 0.1

    vecs, ok = VL.atom14_vectors(true14, mask, aa)
    assert vecs.shape == (B, L, 17, 3)
    # Bond vectors (columns 6+) are bond-length long.
    lengths = np.linalg.norm(np.asarray(vecs)[..., 6:, :], axis=-1)[np.asarray(ok)[..., 6:]]
    assert lengths.min() > 1.2 and lengths.max() < 1.9


def test_torsion_loss_alternatives_and_norm_penalty():
    true = jnp.asarray([[[[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]]])
    alt = jnp.asarray([[[[0.6, 0.8], [0.0, -1.0], [1.0, 0.0]]]])  # the middle one is pi-periodic
    mask = jnp.asarray([[[True, True, False]]])
    has = jnp.asarray([[True]])
    loss, norm = VL.torsion_loss(true * 3.0, true, alt, mask, has)
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(norm) == pytest.approx(2.0, abs=1e-4)
    pred = jnp.asarray([[[[-0.6, -0.8], [0.0, -1.0], [-1.0, 0.0]]]])  # opposite; the alternative; masked
    loss, norm = VL.torsion_loss(pred, true, alt, mask, has)
    assert float(loss) == pytest.approx(2.0, abs=1e-5) and float(norm) == pytest.approx(0.0, abs=1e-4)


def test_esm3_predicted_tokens_replace_the_encoders(encoder_dir, esm3_dir):
    from esm3_jax.inference.forward import load_esm3, make_forward
    from esm3_jax.train.vqvae.stages import Stage2

    batch = _batch()
    key = jax.random.PRNGKey(7)
    plain = Stage2(_stage2_cfg(encoder_dir))
    always = Stage2(_stage2_cfg(encoder_dir, f"train.esm3_checkpoint={esm3_dir}", "train.esm3_token_probability=1"))
    half = Stage2(_stage2_cfg(encoder_dir, f"train.esm3_checkpoint={esm3_dir}"))
    enc_tokens, aa, none = plain.decoder_inputs(batch, key)
    esm_tokens, aa2, used = always.decoder_inputs(batch, key)
    assert none is None and bool(used.all())
    np.testing.assert_array_equal(np.asarray(aa), np.asarray(aa2))

    # Against ESM3 run on its own, chain by chain, on the sequence alone.
    esm3_cfg, esm3_params = load_esm3(esm3_dir)
    esm3_forward = make_forward(esm3_cfg)
    n_codes = plain.encoder_config.n_codes
    # Every indexed chain has >= 30 residues, so every crop is 30 long: one compiled forward.
    assert bool(batch["valid"].all())
    for b in range(batch["aa"].shape[0]):
        n = int(batch["valid"][b].sum())
        seq = "".join(AMINO_ACIDS[i] if i < N_AMINO_ACIDS else "X" for i in np.asarray(batch["aa"][b, :n]))
        out = esm3_forward(esm3_params, {"sequence_tokens": jnp.asarray(T.encode_sequence(seq)[None])})
        expected = np.argmax(np.asarray(out["structure_logits"])[0, 1:-1, :n_codes], -1)
        got, enc = np.asarray(esm_tokens[b, 1 : n + 1]), np.asarray(enc_tokens[b, 1 : n + 1])
        has = np.asarray(batch["has_structure"][b, :n])
        np.testing.assert_array_equal(got[has], expected[has])
        np.testing.assert_array_equal(got[~has], T.STRUCTURE_MASK)
        assert (got[has] != enc[has]).mean() > 0.5  # a random ESM3 disagrees with the encoder
        # The framing (BOS, EOS, PAD) is untouched.
        np.testing.assert_array_equal(np.asarray(esm_tokens[b, [0, n + 1]]), [T.STRUCTURE_BOS, T.STRUCTURE_EOS])
    np.testing.assert_array_equal(np.asarray(esm_tokens)[np.asarray(enc_tokens) >= T.STRUCTURE_MASK],
                                  np.asarray(enc_tokens)[np.asarray(enc_tokens) >= T.STRUCTURE_MASK])

    # p = 0.5: each sample is either all-encoder or all-ESM3, deterministic in the key.
    draws = []
    for k in range(12):
        toks, _, flags = half.decoder_inputs(batch, jax.random.PRNGKey(k))
        for b, f in enumerate(np.asarray(flags)):
            np.testing.assert_array_equal(np.asarray(toks[b]), np.asarray((esm_tokens if f else enc_tokens)[b]))
        draws.append(np.asarray(flags))
        again, _, _ = half.decoder_inputs(batch, jax.random.PRNGKey(k))
        np.testing.assert_array_equal(np.asarray(again), np.asarray(toks))
    assert 0.3 < np.mean(draws) < 0.7


def test_stage2_all_atom_training_and_decoding(encoder_dir, esm3_dir, tmp_path, capsys):
    _need_data()
    out = tmp_path / "s2"
    args = ["train-vqvae", "--config", str(SMALL_STAGE2), "--no-progress", *TINY, "train.steps=2",
            f"train.encoder_checkpoint={encoder_dir}", f"train.esm3_checkpoint={esm3_dir}", f"train.output_dir={out}"]
    assert main(args) == 0
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert {"all_atom_distance", "all_atom_direction", "torsion", "torsion_norm", "plddt", "pae", "esm3_token_fraction"} <= set(header)
    last = dict(zip(header, map(float, rows[-1].split(","))))
    assert all(np.isfinite(v) for v in last.values()) and last["esm3_token_fraction"] in (0.0, 0.5, 1.0)
    result = json.loads((out / "eval.json").read_text())
    for k in ("all_atom_rmsd_mean", "all_atom_lddt_mean", "sidechain_rmsd_local_mean", "chi1_accuracy_mean"):
        assert np.isfinite(result[k]), k
    assert 0.0 <= result["chi1_accuracy_mean"] <= 1.0 and result["sidechain_rmsd_local_mean"] > 0.1

    # The CLI round trip: tokens and sequences out, all-atom PDBs back.
    from esm3_jax.structure.io import load_structure
    from esm3_jax.inference.structure_tokenizer import StructureTokenizer

    f = STRUCTURES / "mdanalysis_mmcif" / "5PTI.cif.gz"
    assert main(["tokenize-structure", "--encoder", str(encoder_dir), "--out", str(tmp_path / "t.npz"),
                 "--fasta", str(tmp_path / "t.fasta"), str(f)]) == 0
    assert main(["decode-structure", "--decoder", str(out / "decoder"), "--tokens", str(tmp_path / "t.npz"),
                 "--out-dir", str(tmp_path / "pdb")]) == 2
    assert "sequence-conditioned" in capsys.readouterr().err
    assert main(["decode-structure", "--decoder", str(out / "decoder"), "--tokens", str(tmp_path / "t.npz"),
                 "--out-dir", str(tmp_path / "pdb"), "--sequences", str(tmp_path / "t.fasta")]) == 0
    written = load_structure(tmp_path / "pdb" / "5PTI.cif.gz_A.pdb")[0]
    truth = load_structure(f)[0]
    assert written.sequence == truth.sequence
    standard = G.TABLES["atom37_mask"][[AMINO_ACIDS.index(a) for a in truth.sequence]]
    np.testing.assert_array_equal(written.atom_mask, standard)  # every heavy atom of every residue
    tok = StructureTokenizer.load(decoder_dir=out / "decoder")
    dec = tok.decode(np.load(tmp_path / "t.npz")["5PTI.cif.gz/A"], sequence=truth.sequence)
    np.testing.assert_allclose(written.coords[standard], dec["atom37"][standard], atol=2e-3)
    np.testing.assert_allclose(written.b_factor, 100 * dec["plddt"], atol=6e-3)


def test_stage2_decoder_starts_from_a_stage1_decoder(encoder_dir, capsys):
    """train.decoder_init: the parameters a stage-1 decoder shares (name and shape) come from it;
    the others (here the sequence input) are the fresh init."""
    from esm3_jax.inference.structure_tokenizer import load_decoder
    from esm3_jax.train.vqvae.stages import Stage2

    donor_dir = Path(encoder_dir).parent / "decoder"  # the fixture's stage-1 export beside its encoder
    donor = {jax.tree_util.keystr(p): np.asarray(v)
             for p, v in jax.tree_util.tree_leaves_with_path(load_decoder(donor_dir)[1]["params"])}
    batch, key = _batch(), jax.random.PRNGKey(0)
    fresh = Stage2(_stage2_cfg(encoder_dir)).init(batch, key)["params"]
    started = Stage2(_stage2_cfg(encoder_dir, f"train.decoder_init={donor_dir}")).init(batch, key)["params"]
    assert "decoder_init:" in capsys.readouterr().out
    taken = kept = 0
    for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(started), jax.tree_util.tree_leaves(fresh)):
        name = jax.tree_util.keystr(path)
        if name in donor and donor[name].shape == new.shape:
            np.testing.assert_array_equal(np.asarray(new), donor[name])
            taken += 1
        else:
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
            kept += 1
    assert taken and kept and any("trunk" in n for n in donor)
    # A resumed run takes its weights from its checkpoint: the donor is not read (it may be gone).
    resumed = Stage2(_stage2_cfg(encoder_dir, f"train.decoder_init={donor_dir}/moved")).init(batch, key, resuming=True)
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], fresh)


def test_decoder_init_is_a_stage2_option(encoder_dir):
    from esm3_jax.train.vqvae.config import load_vqvae_config

    with pytest.raises(ValueError, match="decoder_init"):
        load_vqvae_config(ROOT / "configs" / "vqvae_small.yaml", ENCODER + TINY + ["train.decoder_init=/x"])
