"""SS8 from mkdssp and SASA from biotite (esm3_jax.structure.features), checked against other tools."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from esm3_jax import tokens
from esm3_jax.structure import features, io
from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure.chain import ProteinChain
from tests.paths import STRUCTURES

needs_data = pytest.mark.skipif(
    not (STRUCTURES / "index.jsonl").is_file(), reason=f"real structure data not found at {STRUCTURES}"
)
needs_mkdssp = pytest.mark.skipif(
    shutil.which("mkdssp") is None, reason="mkdssp not installed (Debian package `dssp`)"
)


def _classic_dssp_table(text: str) -> dict[tuple[str, int, str], str]:
    """(chain, residue number, insertion code) -> raw DSSP letter, from a classic .dssp file."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  #  RESIDUE"))
    return {
        (line[11], int(line[5:10]), line[10].strip()): line[16]
        for line in lines[start + 1 :]
        if line[13] != "!"
    }


def _mkdssp_on_file(path: Path, tmp_path: Path) -> dict[tuple[str, int, str], str]:
    cif = tmp_path / "original.cif"
    cif.write_bytes(gzip.decompress(path.read_bytes()))
    out = tmp_path / "original.dssp"
    subprocess.run(["mkdssp", "--output-format", "dssp", str(cif), str(out)], check=True, capture_output=True)
    return _classic_dssp_table(out.read_text())


@needs_data
@needs_mkdssp
def test_ss8_equals_mkdssp_run_on_the_original_file(tmp_path):
    """Our route (chain -> backbone-only gemmi mmCIF -> mkdssp) gives mkdssp's own answer."""
    n_residues = n_polyproline = 0
    for file in ("biopython_tests/1GBT.cif.gz", "biopython_tests/1A7G.cif.gz", "biopython_tests/4ZHL.cif.gz"):
        chains = io.load_structure(STRUCTURES / file)
        direct = _mkdssp_on_file(STRUCTURES / file, tmp_path)
        for chain, ss8 in zip(chains, features.dssp_ss8_chains(chains), strict=True):
            assert len(ss8) == len(chain) and set(ss8) <= set("GHITEBSC") | {features.SS8_UNASSIGNED}
            for i, (num, icode) in enumerate(zip(chain.residue_index.tolist(), chain.insertion_code.tolist())):
                raw = direct.get((chain.chain_id, num, icode))
                if raw is None:
                    assert ss8[i] == features.SS8_UNASSIGNED, (file, chain.chain_id, num)
                    continue
                expected = raw if raw in "HBEGITS" else "C"  # P (polyproline II) and blank are coil
                assert ss8[i] == expected, (file, chain.chain_id, num, raw, ss8[i])
                n_residues += 1
                n_polyproline += raw == "P"
    assert n_residues > 400 and n_polyproline > 0


@needs_data
@needs_mkdssp
def test_ss8_matches_the_reference_dssp_output_for_2beg():
    """2BEG is an amyloid stack of five chains: its strands pair across chains, so DSSP sees them
    only when the chains are assessed together, as the reference file (whole model 1) was."""
    chains = io.load_structure(STRUCTURES / "biopython_tests/2BEG.cif.gz")
    reference = _classic_dssp_table((STRUCTURES / "biopython_tests/2BEG.dssp").read_text())
    together = features.dssp_ss8_chains(chains)
    for chain, ss8 in zip(chains, together, strict=True):
        expected = "".join(
            ("C" if (raw := reference[(chain.chain_id, num, "")]) not in "HBEGITS" else raw)
            for num in chain.residue_index.tolist()
        )
        assert ss8 == expected, chain.chain_id
    assert together[0] == "CEEEEEEEEESCCSEEEEEEEEEEEC"
    # Alone, the outermost chain has no partner strands.
    assert features.dssp_ss8(chains[0]).count("E") < together[0].count("E")


@needs_data
@needs_mkdssp
def test_ss8_where_mkdssp_refuses_the_original_file(tmp_path):
    """6WQA's deposited mmCIF gives mkdssp 4.2 nothing; the gemmi-written copy works."""
    assert _mkdssp_on_file(STRUCTURES / "biopython_tests/6WQA.cif.gz", tmp_path) == {}
    chain = io.load_chain(STRUCTURES / "biopython_tests/6WQA.cif.gz", "A")
    ss8 = features.dssp_ss8(chain)
    assert ss8.count("H") > 0.3 * len(chain) and features.SS8_UNASSIGNED not in ss8


@needs_data
@needs_mkdssp
def test_residues_without_full_backbone_are_unassigned_and_encode_as_no_label():
    chain = io.load_chain(STRUCTURES / "biopython_tests/1GBT.cif.gz", "A")
    coords = chain.coords.copy()
    coords[40, rc.O_IDX] = np.nan  # DSSP needs N, CA, C and O
    broken = ProteinChain.from_coords(chain.sequence, coords)
    ss8 = features.dssp_ss8(broken)
    assert ss8[40] == features.SS8_UNASSIGNED and features.SS8_UNASSIGNED not in ss8[:40]
    ids = tokens.encode_ss8(ss8, add_special_tokens=False)
    assert ids[40] == tokens.SS8_PAD and (ids[:40] >= 3).all()
    # A backbone-only model output (no O at all) gets labels once O is placed from the backbone.
    from esm3_jax.structure.geometry import with_oxygen

    backbone_only = ProteinChain.from_coords(chain.sequence, chain.backbone)
    assert set(features.dssp_ss8(backbone_only)) == {features.SS8_UNASSIGNED}
    rebuilt = ProteinChain.from_coords(chain.sequence, with_oxygen(backbone_only.coords))
    agree = np.mean([a == b for a, b in zip(features.dssp_ss8(rebuilt), features.dssp_ss8(chain))])
    assert agree > 0.9, agree


def test_missing_mkdssp_is_a_clear_error(monkeypatch, tmp_path):
    chain = ProteinChain.from_coords("AAA", np.zeros((3, 3, 3)))
    with pytest.raises(features.DsspNotFoundError, match="apt-get install dssp"):
        features.dssp_ss8(chain, mkdssp=tmp_path / "no" / "mkdssp")
    monkeypatch.setenv(features.MKDSSP_ENV, str(tmp_path / "elsewhere" / "mkdssp"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        features.find_mkdssp()


@needs_data
def test_sasa_agrees_with_freesasa(tmp_path):
    """biotite and freesasa, both Shrake-Rupley with 1,000 points and ProtOr radii, per residue."""
    freesasa = pytest.importorskip("freesasa")
    freesasa.setVerbosity(freesasa.silent)
    params = freesasa.Parameters({"algorithm": freesasa.ShrakeRupley, "n-points": 1000, "probe-radius": 1.4})
    for file, chain_id in [
        ("biopython_tests/1GBT.cif.gz", "A"),
        ("biopython_tests/1A8O.cif.gz", "A"),  # selenomethionines, scored as methionine
        ("theseus_examples/cytochromes/d1csu__.pdb.gz", ""),  # blank chain id
    ]:
        chain = io.load_chain(STRUCTURES / file, chain_id)
        ours = features.sasa(chain)
        # freesasa reads the chain from a PDB file with its own residue/atom radius tables.
        pdb = tmp_path / "chain.pdb"
        pdb.write_text(io.to_pdb_string(chain, canonical_names=True))
        areas = freesasa.calc(freesasa.Structure(str(pdb)), params).residueAreas()[chain.chain_id or " "]
        theirs = np.array(
            [areas[f"{n}{ic}"].total for n, ic in zip(chain.residue_index.tolist(), chain.insertion_code.tolist())]
        )
        np.testing.assert_allclose(ours, theirs, atol=0.05, rtol=0, err_msg=file)
        assert 4000 < ours.sum() < 20000, file  # Å², a small globular protein


@needs_data
def test_sasa_bins_into_the_sasa_track():
    chain = io.load_chain(STRUCTURES / "biopython_tests/1GBT.cif.gz", "A")
    values = features.sasa(chain)
    ids = features.sasa_tokens(values)
    np.testing.assert_array_equal(ids, 3 + np.searchsorted(np.float32(tokens.SASA_BIN_EDGES), values))
    # The spec's edges split residues into roughly equal bins (chosen that way on real
    # structures): our values fill them so too (each bin 2-13 % of 1GBT's 223 residues; over 40
    # test-bed chains 3-13 %, with the buried first bin the fullest).
    share = np.bincount(ids - 3, minlength=16) / len(ids)
    assert ids.min() >= 3 and ids.max() <= 18 and (share > 0).sum() >= 15 and share.max() < 0.15, share
    # A residue without any atom has no SASA: NaN, then <unk>.
    coords = chain.coords.copy()
    coords[7] = np.nan
    values = features.sasa(ProteinChain.from_coords(chain.sequence, coords))
    assert np.isnan(values[7]) and np.isfinite(np.delete(values, 7)).all()
    assert features.sasa_tokens(values)[7] == 2
