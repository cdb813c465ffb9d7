"""The protein-task verbs (esm3_jax/inference/tasks.py): fold and inverse-fold end to end on a tiny
random ESM3 and a tiny random structure decoder, their agreement with the generation engine,
seeding, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.cli import main
from tests.paths import CONFIGS, STRUCTURES

NATIVE = "mdanalysis_mmcif/5PTI.cif.gz"  # BPTI, 58 residues
NATIVE2 = "biopython_tests/1A8O.cif.gz"  # 70 residues, with MSE (X in its sequence)


def _need_structures():
    if not STRUCTURES.is_dir():
        pytest.skip(f"real structures not found at {STRUCTURES} (the shared data folder is absent)")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A random tiny ESM3 (configs/tiny.yaml: d_model 64, 2 layers) and a random tiny structure decoder."""
    from esm3_jax.compat.params_io import save_params
    from esm3_jax.config import to_dict
    from esm3_jax.model.esm3 import init_params
    from esm3_jax.model.vqvae import DecoderConfig, StructureDecoder
    from esm3_jax.train.config import load_config

    tmp = tmp_path_factory.mktemp("tasks")
    cfg = load_config(CONFIGS / "tiny.yaml").model
    params = nn.unbox(init_params(cfg, jax.random.PRNGKey(3)))
    esm3 = save_params(tmp / "esm3", params, to_dict(cfg), "esm3")
    dcfg = DecoderConfig(d_model=32, n_heads=2, n_layers=1)
    toks = np.full((1, 8), T.STRUCTURE_MASK, np.int32)
    dvars = nn.unbox(jax.jit(StructureDecoder(dcfg).init)(jax.random.PRNGKey(4), toks))
    dec = save_params(tmp / "dec", {"params": dvars["params"]}, to_dict(dcfg), "structure-decoder")
    return cfg, params, esm3, dec, tmp


def _read_bfactors(pdb: Path) -> tuple[np.ndarray, list[str]]:
    """Per-CA B-factors (columns 61-66) and atom names, read from the ATOM lines themselves."""
    lines = [l for l in pdb.read_text().splitlines() if l.startswith("ATOM")]
    ca = [float(l[60:66]) for l in lines if l[12:16].strip() == "CA"]
    return np.array(ca), [l[12:16].strip() for l in lines]


def test_fold_fasta_writes_pdbs_with_plddt(ckpts, tmp_path, capsys):
    import biotite.structure.io as bsio
    import gemmi

    from esm3_jax.inference.generate import generate
    from esm3_jax.inference.structure_tokenizer import StructureTokenizer
    from esm3_jax.inference.tasks import fold_inputs

    cfg, params, esm3, dec, _ = ckpts
    seqs = {"first": "MKTAYIAKQRQISFVKSHFSRQ", "second|odd": "GSHMLEDPVDAFQLGGSWKAELVNQLSKEGVTAEEAKQLLE"}
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k} some description\n{v[:10]}\n{v[10:]}\n" for k, v in seqs.items()))
    out = tmp_path / "fold"
    assert main(["fold", "--checkpoint", str(esm3), "--decoder", str(dec), "--fasta", str(fasta), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pTM=" in printed and "mean_pLDDT=" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [p["name"] for p in summary["proteins"]] == list(seqs)
    tokens = np.load(out / "structure_tokens.npz")
    # The tokens are the engine's: generate on the structure track, argmax, one step, same inputs.
    ref = generate(cfg, params, fold_inputs(list(seqs.values())), "structure", 1, strategy="entropy",
                   temperature=0.0, temperature_annealing=False)["structure_tokens"]
    tok = StructureTokenizer.load(decoder_dir=dec)
    for i, (entry, (name, seq)) in enumerate(zip(summary["proteins"], seqs.items())):
        pdb = out / entry["pdb"]
        assert pdb.name == ("first.pdb" if i == 0 else "second_odd.pdb")
        codes = tokens[pdb.stem]
        assert codes.shape == (len(seq),) and ((codes >= 0) & (codes < 4096)).all()
        np.testing.assert_array_equal(codes, ref[i, 1 : len(seq) + 1])
        decoded = tok.decode(codes)
        assert entry["ptm"] == pytest.approx(decoded["ptm"], abs=1e-6)
        assert entry["mean_plddt"] == pytest.approx(float(decoded["plddt"].mean()), abs=1e-6)
        assert 0 <= entry["ptm"] <= 1 and 0 <= entry["mean_plddt"] <= 1
        b, atoms = _read_bfactors(pdb)
        np.testing.assert_allclose(b, 100 * decoded["plddt"], atol=6e-3)  # PDB keeps 2 decimals
        assert {"N", "CA", "C"} <= set(atoms)
        st = gemmi.read_structure(str(pdb))
        assert len(st[0][0]) == len(seq) and gemmi.one_letter_code([r.name for r in st[0][0]]).upper() == seq
        arr = bsio.load_structure(str(pdb), extra_fields=["b_factor"])
        assert (arr.atom_name == "CA").sum() == len(seq)
        np.testing.assert_allclose(arr.b_factor[arr.atom_name == "CA"], b)


def test_fold_against_native(ckpts, tmp_path, capsys):
    from esm3_jax.structure.io import load_structure

    _need_structures()
    _, _, esm3, dec, _ = ckpts
    native = STRUCTURES / NATIVE
    chain = load_structure(native)[0]
    out = tmp_path / "fold"
    assert main(["fold", "--checkpoint", str(esm3), "--decoder", str(dec), "--sequence", chain.sequence,
                 "--native", str(native), "--out-dir", str(out), "--num-steps", "3"]) == 0
    assert "TM=" in capsys.readouterr().out
    (entry,) = json.loads((out / "summary.json").read_text())["proteins"]
    for k in ("backbone_rmsd", "lddt_ca", "tm_score", "ptm", "mean_plddt"):
        assert np.isfinite(entry[k]), k
    assert entry["backbone_rmsd"] > 0 and 0 <= entry["lddt_ca"] <= 1 and 0 < entry["tm_score"] <= 1
    assert (out / "protein.pdb").is_file()


def test_inverse_fold(ckpts, tmp_path, capsys):
    from esm3_jax.structure.io import load_structure

    _need_structures()
    _, _, esm3, _, _ = ckpts
    native = STRUCTURES / NATIVE2
    chain = load_structure(native)[0]
    # The same file again, named for its chain: the samples are still named 1A8O_A (not 1A8O_A_A).
    named = tmp_path / f"1A8O_{chain.chain_id}.cif.gz"
    named.write_bytes(native.read_bytes())
    runs = []
    for name, structure in (("a", native), ("b", named)):
        out = tmp_path / f"{name}.fasta"
        assert main(["inverse-fold", "--checkpoint", str(esm3), "--structure", str(structure), "--chain", chain.chain_id,
                     "--out", str(out), "--num-samples", "3", "--num-steps", "4", "--temperature", "1.0", "--seed", "7"]) == 0
        printed = capsys.readouterr().out
        assert "sequence recovery: mean" in printed
        lines = out.read_text().splitlines()
        headers, seqs = lines[0::2], lines[1::2]
        assert len(seqs) == 3 and all(h.startswith(">1A8O_A_sample") and "recovery=" in h for h in headers)
        for s in seqs:
            assert len(s) == len(chain) and set(s) <= set("ACDEFGHIKLMNPQRSTVWY")
        runs.append(seqs)
    assert runs[0] == runs[1]  # same seed, same sequences
    assert len(set(runs[0])) > 1  # samples differ from one another (temperature 1 on random weights)


def test_bad_input(ckpts, tmp_path, capsys):
    _need_structures()
    _, _, esm3, dec, _ = ckpts

    def fails(argv, *needles):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        for n in needles:
            assert n in err, (n, err)

    fold = ["fold", "--checkpoint", str(esm3), "--decoder", str(dec), "--out-dir", str(tmp_path / "o")]
    fails(fold + ["--sequence", "MKTAYJAK"], "'J' at position 6")
    bad = tmp_path / "bad.fasta"
    bad.write_text(">p1\nMKTAyIAK\n")
    fails(fold + ["--fasta", str(bad)], "bad.fasta", "'y' at position 5")
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    fails(fold + ["--fasta", str(empty)], "empty.fasta")
    dup = tmp_path / "dup.fasta"
    dup.write_text(">p1\nMKT\n>p1\nAYI\n")
    fails(fold + ["--fasta", str(dup)], "dup.fasta", "'p1' appears twice")
    fails(fold + ["--fasta", str(tmp_path / "missing.fasta")], "missing.fasta")
    # A checkpoint of the wrong kind, either way round.
    fails(["fold", "--checkpoint", str(dec), "--decoder", str(dec), "--sequence", "MKT", "--out-dir", str(tmp_path / "o")],
          str(dec), "not esm3")
    fails(["fold", "--checkpoint", str(esm3), "--decoder", str(esm3), "--sequence", "MKT", "--out-dir", str(tmp_path / "o")],
          str(esm3), "not a structure-decoder")
    fails(fold + ["--sequence", "MKT", "--native", str(STRUCTURES / NATIVE)], "5PTI.cif.gz", "58 residues")

    inv = ["inverse-fold", "--checkpoint", str(esm3), "--out", str(tmp_path / "x.fasta")]
    nonprotein = tmp_path / "water.pdb"
    nonprotein.write_text("HETATM    1  O   HOH A   1       0.000   0.000   0.000  1.00  0.00           O\nEND\n")
    fails(inv + ["--structure", str(nonprotein)], "water.pdb", "no protein")
    fails(inv + ["--structure", str(STRUCTURES / NATIVE), "--chain", "Q"], "5PTI.cif.gz", "'Q'")
    fails(inv + ["--structure", str(tmp_path / "none.pdb")], "none.pdb")
    fails(["inverse-fold", "--checkpoint", str(dec), "--structure", str(STRUCTURES / NATIVE), "--out", str(tmp_path / "x.fasta")],
          str(dec), "not esm3")
    assert not (tmp_path / "x.fasta").exists()


def test_fasta_from_a_pipe_survives_the_command_restarting_under_tcmalloc(tmp_path):
    """`--fasta <(...)` (bash hands over /dev/fd/N, a pipe, no regular file) is read, also by the
    command run as a program, which first re-executes itself under tcmalloc: the letter check
    sees the piped entry, before any checkpoint is opened."""
    import os
    import subprocess
    import sys

    from esm3_jax.inference.tasks import read_fasta
    from tests.paths import REPO

    read_end, write_end = os.pipe()
    os.write(write_end, b">x\nMKTAYIAKQR\n>y\nGSHMLEDPVD\n")
    os.close(write_end)
    try:
        assert read_fasta(f"/dev/fd/{read_end}") == [("x", "MKTAYIAKQR"), ("y", "GSHMLEDPVD")]
    finally:
        os.close(read_end)

    read_end, write_end = os.pipe()
    os.write(write_end, b">x\nMKTAYJAKQR\n")
    os.close(write_end)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ESM3_JAX_ALLOCATOR")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    try:
        out = subprocess.run([sys.executable, "-m", "esm3_jax.cli", "fold", "--checkpoint", str(tmp_path / "none"),
                              "--decoder", str(tmp_path / "none"), "--fasta", f"/dev/fd/{read_end}", "--out-dir",
                              str(tmp_path / "out")], pass_fds=(read_end,), capture_output=True, text=True, env=env,
                             cwd=REPO, timeout=120)
    finally:
        os.close(read_end)
    assert out.returncode == 2
    assert f"/dev/fd/{read_end}: entry 'x': character 'J' at position 6" in out.stderr, out.stderr
