"""The structure tokenizer end to end on real files: convert -> tokenize-structure ->
decode-structure against the reference, bad input, and a tiny train-vqvae run (resumed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from tests.paths import CONFIGS, STRUCTURES

FILES = ("mdanalysis_mmcif/5PTI.cif.gz", "mustang_testdata/1paa.pdb.gz")
D, VH, DOUT, NCODES, HEADS = 64, 8, 16, 64, 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Reference encoder/decoder with random weights, saved as .pth and converted by the CLI."""
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")
    torch = pytest.importorskip("torch", reason="the reference needs torch (pip install -e '.[test]')")
    vqvae = pytest.importorskip("esm.models.vqvae", reason="reference `esm` package not installed")
    torch.manual_seed(1)
    enc = vqvae.StructureTokenEncoder(d_model=D, n_heads=1, v_heads=VH, n_layers=2, d_out=DOUT, n_codes=NCODES).eval()
    dec = vqvae.StructureTokenDecoder(d_model=D, n_heads=HEADS, n_layers=2).eval()
    with torch.no_grad():
        enc.codebook.embeddings.normal_(0.0, 0.5)
    tmp = tmp_path_factory.mktemp("vqvae")
    torch.save(enc.state_dict(), tmp / "enc.pth")
    torch.save(dec.state_dict(), tmp / "dec.pth")
    assert main(["convert", "--kind", "structure-encoder", "--torch-state-dict", str(tmp / "enc.pth"), "--out", str(tmp / "enc")]) == 0
    assert main(["convert", "--kind", "structure-decoder", "--torch-state-dict", str(tmp / "dec.pth"), "--out", str(tmp / "dec"),
                 "--n-heads", str(HEADS)]) == 0
    return torch, enc, dec, tmp


def test_convert_needs_head_count_for_the_decoder(converted, capsys):
    _, _, _, tmp = converted
    rc = main(["convert", "--kind", "structure-decoder", "--torch-state-dict", str(tmp / "dec.pth"), "--out", str(tmp / "x")])
    assert rc == 2 and "--n-heads" in capsys.readouterr().err
    # Export gives back the state dict the reference loads strictly.
    assert main(["convert", "--export", str(tmp / "dec"), "--out", str(tmp / "dec_back.pth")]) == 0
    torch, _, dec, _ = converted
    dec.load_state_dict(torch.load(tmp / "dec_back.pth"), strict=True)


def test_tokenize_and_decode_match_the_reference(converted, tmp_path, capsys):
    from esm3_jax.structure.geometry import place_oxygen
    from esm3_jax.structure.io import load_structure

    torch, enc, dec, tmp = converted
    files = [str(STRUCTURES / f) for f in FILES]
    out = tmp_path / "tokens.npz"
    assert main(["tokenize-structure", "--encoder", str(tmp / "enc"), "--out", str(out), *files]) == 0
    npz = np.load(out)
    expected_keys = {f"{Path(f).name}/{c.chain_id}" for f in files for c in load_structure(f)}
    assert set(npz.files) == expected_keys
    for f in files:
        for chain in load_structure(f):
            codes = npz[f"{Path(f).name}/{chain.chain_id}"]
            with torch.no_grad():
                _, ref = enc.encode(torch.from_numpy(chain.backbone[None].astype(np.float32)),
                                    residue_index=torch.from_numpy(chain.residue_index[None].astype(np.int64)))
            has = chain.backbone_mask
            assert codes.shape == (len(chain),) and codes.dtype == np.int32
            np.testing.assert_array_equal(codes[has], ref.numpy()[0][has])
            assert np.all(codes[~has] == -1)

    capsys.readouterr()
    assert main(["decode-structure", "--decoder", str(tmp / "dec"), "--tokens", str(out), "--out-dir", str(tmp_path / "pdb")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == len(npz.files) and all("pTM=" in line for line in printed)
    key = sorted(npz.files)[0]
    codes = npz[key]
    tokens = torch.from_numpy(T.encode_structure_tokens(codes).astype(np.int64))[None]
    with torch.no_grad():
        ref = dec.decode(tokens)
    written = load_structure(tmp_path / "pdb" / (key.replace("/", "_") + ".pdb"))[0]
    assert len(written) == len(codes)
    # PDB keeps 3 decimals (Å) and 2 for B-factors.
    np.testing.assert_allclose(written.backbone, ref["bb_pred"].numpy()[0, 1:-1], atol=2e-3)
    np.testing.assert_allclose(written.b_factor, 100 * ref["plddt"].numpy()[0, 1:-1], atol=6e-3)
    # The carbonyl O is placed wherever the decoded C(i)-N(i+1) is a plausible peptide bond.
    placed = np.isfinite(place_oxygen(ref["bb_pred"].numpy()[0, 1:-1])).all(-1)
    np.testing.assert_array_equal(np.isfinite(written.coords[:, 4]).all(-1), placed)
    ptms = {line.split("\t")[0]: float(line.split("pTM=")[1]) for line in printed}
    assert ptms[key] == pytest.approx(float(ref["ptm"][0]), abs=1e-4)


def test_bad_input(converted, tmp_path, capsys):
    from esm3_jax.inference.structure_tokenizer import StructureTokenizer

    _, _, _, tmp = converted
    bogus = tmp_path / "notes.pdb"
    bogus.write_text("this is not a structure\n")
    assert main(["tokenize-structure", "--encoder", str(tmp / "enc"), "--out", str(tmp_path / "t.npz"), str(bogus)]) == 2
    err = capsys.readouterr().err
    assert "notes.pdb" in err and len(err.strip().splitlines()) == 1
    assert main(["tokenize-structure", "--encoder", str(tmp / "dec"), "--out", str(tmp_path / "t.npz"), str(bogus)]) == 2
    assert "not a structure-encoder" in capsys.readouterr().err

    tok = StructureTokenizer.load(tmp / "enc", tmp / "dec")
    bb = np.random.default_rng(0).normal(size=(20, 3, 3)).astype(np.float32) * 5
    bb[4] = np.nan
    bb[7, 0] = [1e7, 0, 0]  # absurd: masked like a missing atom
    codes = tok.tokenize(bb)
    assert codes[4] == -1 and codes[7] == -1 and (np.delete(codes, [4, 7]) >= 0).all()
    with pytest.raises(ValueError, match="none of the 3 residues"):
        tok.tokenize(np.full((3, 3, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="structure"):
        tok.decode(np.array([1, 2, 5000]))
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 2), np.int32))
    assert main(["decode-structure", "--decoder", str(tmp / "dec"), "--tokens", str(tmp_path / "bad.npz"),
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "'x' must be a 1-D integer array" in capsys.readouterr().err


def test_folded_token_table_decodes_like_training():
    """After export, decoding tokens equals the training-time decoding of z_q."""
    from esm3_jax.model.vqvae import DecoderConfig, EncoderConfig, StructureDecoder
    from esm3_jax.train.vqvae.model import VQVAE, fold_code_embeddings, frame_tokens

    enc = EncoderConfig(d_model=32, v_heads=4, d_out=8, n_codes=16)
    dec = DecoderConfig(d_model=32, n_heads=2, n_layers=1)
    model = VQVAE(enc, dec)
    rng = np.random.default_rng(0)
    coords = np.cumsum(rng.normal(size=(1, 12, 3, 3)) * 1.5, axis=1).astype(np.float32)
    coords[0, 10:] = np.nan  # padding
    valid = np.arange(12)[None] < 10
    args = (coords, np.arange(12)[None], np.zeros((1, 12), np.int32), valid)
    v = nn.unbox(jax.jit(model.init)({"params": jax.random.PRNGKey(0), "codebook": jax.random.PRNGKey(1)}, *args))
    out = jax.jit(model.apply)(v, *args)
    folded = fold_code_embeddings(v["params"], v["codebook"])
    framed = frame_tokens(out["tokens"], out["has_token"], jnp.asarray(valid))
    assert int(framed[0, 0]) == T.STRUCTURE_BOS and int(framed[0, 11]) == T.STRUCTURE_EOS
    again = jax.jit(StructureDecoder(dec).apply)({"params": folded}, framed)
    np.testing.assert_allclose(np.asarray(again["backbone"])[0, 1:11], np.asarray(out["backbone"])[0, :10], atol=1e-4)


def test_train_vqvae_tiny_run_and_resume(tmp_path, capsys):
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")
    config = CONFIGS / "vqvae_small.yaml"
    overrides = [
        "encoder.d_model=32", "encoder.v_heads=4", "encoder.d_out=8", "encoder.n_codes=32", "decoder.d_model=32",
        "decoder.n_heads=2", "decoder.n_layers=1", "train.steps=3", "train.log_every=1", "train.batch_size=2",
        "train.crop_length=32", "train.max_train_chains=3", "train.max_valid_chains=2", "train.eval_max_length=64",
        "train.vq_warmup_steps=2", f"train.output_dir={tmp_path}",
        # The config trains on FAPE alone; the paper's distance, direction and inverse-folding
        # losses are turned on beside it so that their path runs too.
        "train.loss_weights.distance=1", "train.loss_weights.direction=1", "train.loss_weights.inverse_folding=1",
    ]
    assert main(["train-vqvae", "--config", str(config), "--no-progress", *overrides]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["chains"] == 2 and 0 < result["codes_used"] <= 32 and np.isfinite(result["backbone_rmsd_mean"])
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 4 and {"fape", "distance", "direction", "commitment", "inverse_folding", "codebook_perplexity"} <= set(header)
    assert all(np.isfinite(float(x)) for x in rows[-1].split(","))
    capsys.readouterr()
    # Run again: it resumes from the last checkpoint instead of starting over.
    assert main(["train-vqvae", "--config", str(config), "--no-progress", *overrides]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    # Every saved step unreadable: it starts over, fully initialised (the codebook fitted to the
    # first batch as in a first run), and ends where the first run ended.
    for step_dir in (tmp_path / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            shutil.rmtree(step_dir / "state")
    with pytest.warns(RuntimeWarning, match="incomplete or corrupted"):
        assert main(["train-vqvae", "--config", str(config), "--no-progress", *overrides]) == 0
    assert "resumed" not in capsys.readouterr().out
    again = json.loads((tmp_path / "eval.json").read_text())
    assert {k: v for k, v in again.items() if "seconds" not in k} == {k: v for k, v in result.items() if "seconds" not in k}
    # Evaluate the exported checkpoints again, on crops of another length, without training.
    assert main(["train-vqvae", "--config", str(config), "--eval-only", *overrides[:-1],
                 f"train.output_dir={tmp_path}", "train.eval_max_length=16"]) == 0
    crops = json.loads(capsys.readouterr().out)
    assert crops["eval_max_length"] == 16 and crops["chains"] == 2 and crops["split"] == "valid"
    assert all(np.isfinite(crops[k]) for k in ("lddt_ca_mean", "drms_mean", "mirror_rmsd_mean", "mirror_closer_fraction"))
    assert main(["train-vqvae", "--config", str(config), "--eval-only", f"train.output_dir={tmp_path / 'none'}"]) == 2
    assert "no exported checkpoint" in capsys.readouterr().err
    # A run that would end inside its VQ warm-up (codebook never fitted) is refused up front.
    assert main(["train-vqvae", "--config", str(config), *overrides, "train.vq_warmup_steps=3"]) == 2
    assert "train.vq_warmup_steps=3 must be in [0, train.steps=3)" in capsys.readouterr().err

    # Stage 2: the encoder just trained, frozen; a fresh sequence-conditioned decoder with the
    # confidence losses.
    stage2 = [o for o in overrides if not o.startswith("train.output_dir")] + [
        "train.stage=2", f"train.encoder_checkpoint={tmp_path / 'encoder'}", f"train.output_dir={tmp_path / 's2'}",
        "decoder.sequence_conditioning=true", "train.loss_weights.inverse_folding=0", "train.loss_weights.plddt=1",
        "train.loss_weights.pae=1", "train.steps=1",
    ]
    assert main(["train-vqvae", "--config", str(config), "--no-progress", *stage2]) == 0
    header = (tmp_path / "s2" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"plddt", "pae", "distance"} <= set(header) and "commitment" not in header
    assert json.loads((tmp_path / "s2" / "eval.json").read_text())["chains"] == 2
