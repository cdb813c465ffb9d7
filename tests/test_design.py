"""Free design (esm3_jax/data/design.py, `esm3-jax generate --length N --out-dir D`): prompts of
every kind end to end on a tiny random ESM3 and decoder, prompted positions never changing,
seeding and batching, and bad input."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from tests.paths import CONFIGS, STRUCTURES

MOTIF_FILE = "mdanalysis_mmcif/5PTI.cif.gz"  # BPTI, residues 1-58 of chain A
LENGTH = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny ESM3 (configs/tiny.yaml), a random tiny structure decoder and a small
    function vocabulary built from text."""
    from esm3_jax.compat.params_io import save_params
    from esm3_jax.config import to_dict
    from esm3_jax.data.function_tokens import build_function_vocab, save_function_vocab
    from esm3_jax.model.esm3 import init_params
    from esm3_jax.model.vqvae import DecoderConfig, StructureDecoder
    from esm3_jax.train.config import load_config

    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")
    tmp = tmp_path_factory.mktemp("design")
    cfg = load_config(CONFIGS / "tiny.yaml").model
    esm3 = save_params(tmp / "esm3", nn.unbox(init_params(cfg, jax.random.PRNGKey(3))), to_dict(cfg), "esm3")
    dcfg = DecoderConfig(d_model=32, n_heads=2, n_layers=1)
    dvars = nn.unbox(jax.jit(StructureDecoder(dcfg).init)(jax.random.PRNGKey(4), np.full((1, 8), T.STRUCTURE_MASK, np.int32)))
    dec = save_params(tmp / "dec", {"params": dvars["params"]}, to_dict(dcfg), "structure-decoder")
    vocab = save_function_vocab(build_function_vocab({
        "IPR000001": ["zinc finger, dna binding"], "IPR000002": ["kinase domain, atp binding"],
        "IPR000003": ["membrane transporter"]}), tmp / "fvocab")
    return {"esm3": esm3, "dec": dec, "vocab": vocab, "motif": STRUCTURES / MOTIF_FILE}


def _design_args(s, out_dir, *extra):
    return ["generate", "--checkpoint", str(s["esm3"]), "--length", str(LENGTH), "--out-dir", str(out_dir),
            "--sequence-prompt", "MK_TAY", "--sequence-offset", "2", "--ss8-prompt", "HHHHHHHH___EEEE",
            "--motif", f"{s['motif']}:A:10-16@25", "--motif-sequence",
            "--function-prompt", "zinc finger,IPR000002:30-38", "--function-vocab", str(s["vocab"]),
            "--tracks", "ss8,structure,sequence", "--num-steps", "3,4,4", "--num-samples", "2",
            "--seed", "5", *extra]


def test_free_design_end_to_end(setup, tmp_path, capsys):
    """Every prompt kind at once, chain of thought ss8 -> structure -> sequence, 2 samples decoded
    to PDBs: prompted residues come out as prompted, the PDBs open in gemmi and biotite with the
    pLDDT in their B-factors, the same seed gives the same designs and the two samples differ."""
    import biotite.structure.io as bsio
    import gemmi

    from esm3_jax.structure.io import load_structure

    s = setup
    out = tmp_path / "d"
    assert main(_design_args(s, out, "--decoder", str(s["dec"]))) == 0
    assert "generate: 2 design(s) of 40 residues" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    lines = (out / "design.fasta").read_text().splitlines()
    seqs = lines[1::2]
    assert [l.split()[0] for l in lines[0::2]] == [">sample_0", ">sample_1"]
    assert seqs == [e["sequence"] for e in summary["samples"]] and seqs[0] != seqs[1]
    motif = load_structure(s["motif"], "A")[0]
    motif_seq = motif.sequence[9:16]  # author residues 10-16 of 5PTI chain A (numbered from 1)
    assert summary["prompts"]["motifs"][0]["sequence"] == motif_seq
    for e, seq in zip(summary["samples"], seqs):
        assert len(seq) == LENGTH and set(seq) <= set("ACDEFGHIKLMNPQRSTVWY")
        # The prompted positions, read back from the files the user gets.
        assert seq[2:4] == "MK" and seq[5:8] == "TAY" and seq[24:31] == motif_seq
        assert e["ss8"][:8] == "HHHHHHHH" and e["ss8"][11:15] == "EEEE" and set(e["ss8"]) <= set("GHITEBSC")
        assert e["prompts_honoured"] == {"sequence": True, "ss8": True, "motif_coordinates": True, "function": True}
        assert 0 <= e["ptm"] <= 1 and 0 <= e["mean_plddt"] <= 1 and np.isfinite(e["motif_backbone_rmsd"])
        pdb = out / e["pdb"]
        st = gemmi.read_structure(str(pdb))
        assert gemmi.one_letter_code([r.name for r in st[0][0]]).upper() == seq
        arr = bsio.load_structure(str(pdb), extra_fields=["b_factor"])
        b = arr.b_factor[arr.atom_name == "CA"]
        assert len(b) == LENGTH and abs(b.mean() / 100 - e["mean_plddt"]) < 1e-3
    # Same seed, same designs (the decoder left out: nothing about the tokens depends on it).
    assert main(_design_args(s, tmp_path / "again")) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert [e["sequence"] for e in again["samples"]] == seqs
    assert [e["ss8"] for e in again["samples"]] == [e["ss8"] for e in summary["samples"]]
    assert not list((tmp_path / "again").glob("*.pdb"))


def test_design_batching_and_seeds(setup):
    """Sample i depends on the seed and i only: 2 samples are the first 2 of 4, whether the 4 run
    2 rows at a time or one at a time; another seed gives other designs; the prompt holds."""
    from esm3_jax.data.design import build_prompt, design
    from esm3_jax.inference.forward import load_esm3

    cfg, params = load_esm3(setup["esm3"])
    prompt = build_prompt(LENGTH, sequence="W__W", sequence_offset=10, ss8="EEEE", ss8_offset=20)
    plan = [("sequence", 4)]
    run = lambda n, seed=5, bs=2: design(cfg, params, prompt, plan, num_samples=n, seed=seed, batch_size=bs)[0]["sequence_tokens"]
    four = run(4)
    np.testing.assert_array_equal(run(2), four[:2])
    np.testing.assert_array_equal(run(4, bs=1), four)
    assert len({tuple(r) for r in four}) == 4
    assert np.any(run(2, seed=6) != four[:2])
    for row in four:
        seq = T.decode_sequence(row)
        assert seq[10] == seq[13] == "W"


def test_track_with_nothing_masked_is_skipped(setup, tmp_path, capsys):
    """A sequence prompt that covers every residue leaves the sequence track nothing to do."""
    s = setup
    full = "ACDEFGHIKLMNPQRSTVWY" * 2
    assert main(["generate", "--checkpoint", str(s["esm3"]), "--length", str(LENGTH), "--out-dir", str(tmp_path),
                 "--sequence-prompt", full, "--tracks", "sequence", "--num-samples", "2", "--batch-size", "2"]) == 0
    assert "sequence: every residue prompted" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan"][0]["skipped"] and [e["sequence"] for e in summary["samples"]] == [full, full]


def test_bad_input(setup, tmp_path, capsys):
    s = setup

    def fails(extra, *needles, base=None):
        argv = (base or ["generate", "--checkpoint", str(tmp_path / "never-read"), "--length", "20",
                         "--out-dir", str(tmp_path / "o")]) + extra
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        for n in needles:
            assert n in err, (n, err)

    # All of these stop before the checkpoint is read (it does not exist).
    fails(["--sequence-prompt", "M" * 21], "--sequence-prompt", "21 letters", "--length 20")
    fails(["--sequence-prompt", "MKT", "--sequence-offset", "18"], "offset 18")
    fails(["--sequence-prompt", "MKJT"], "'J' at prompt position 3")
    fails(["--ss8-prompt", "HHQ"], "--ss8-prompt", "'Q' at prompt position 3")
    fails(["--motif", f"{s['motif']}:A:200-205@1"], "residue 200 is not in", "5PTI.cif.gz", "chain 'A'")
    fails(["--motif", f"{s['motif']}:Q:1-5@1"], "5PTI.cif.gz", "'Q'")
    fails(["--motif", f"{s['motif']}:A:1-5"], "FILE:CHAIN:RESIDUES@POSITION")
    fails(["--motif", f"{s['motif']}:A:1-5@18"], "do not fit --length 20")
    fails(["--motif", str(tmp_path / "none.pdb") + ":A:1-5@1"], "none.pdb")
    fails(["--motif", f"{s['motif']}:A:1-5@1", "--motif", f"{s['motif']}:A:10-12@5"], "residue 5 is already taken")
    fails(["--sequence-prompt", "AAAAAAAAAA", "--motif", f"{s['motif']}:A:1-5@1", "--motif-sequence"], "where --sequence-prompt has 'A'")
    fails(["--function-prompt", "zinc:1-5"], "needs --function-vocab")
    fails(["--function-prompt", "nonsense word:1-5", "--function-vocab", str(s["vocab"])], "'nonsense word'")
    fails(["--function-prompt", "zinc:5-30", "--function-vocab", str(s["vocab"])], "5-30 does not fit")
    fails(["--tracks", "sequence,coordinates"], "unknown track 'coordinates'")
    fails(["--tracks", "ss8,sequence", "--num-steps", "1,2,3"], "one per track")
    fails(["--tracks", "ss8", "--sequence-prompt", "MK"], "add 'sequence'")
    fails(["--decoder", str(s["dec"]), "--tracks", "sequence"], "--decoder needs 'structure'")
    fails(["--length", "0"], "--length must be >= 1", base=["generate", "--checkpoint", "x", "--out-dir", "o"])
    # The two forms of the verb do not mix.
    fails(["--track", "sequence"], "--track and --out belong to generate --inputs")
    fails(["--sequence-prompt", "MK"], "--sequence-prompt is an option of free design",
          base=["generate", "--checkpoint", "x", "--inputs", "x.npz", "--track", "sequence", "--num-steps", "2", "--out", "o.npz"])
    # A checkpoint of the wrong kind.
    fails([], str(s["dec"]), "not esm3", base=["generate", "--checkpoint", str(s["dec"]), "--length", "20", "--out-dir", str(tmp_path / "o")])
