"""Structure files in and out (esm3_jax.structure.io) on the real chains in ../shared/data/structures."""

from __future__ import annotations

import collections
import gzip
import json
import time
from pathlib import Path

import gemmi
import numpy as np
import pytest

from esm3_jax.structure import io
from esm3_jax.structure import residue_constants as rc
from esm3_jax.structure.chain import ProteinChain, StructureError, join_chains
from tests.paths import STRUCTURES

pytestmark = pytest.mark.skipif(
    not (STRUCTURES / "index.jsonl").is_file(), reason=f"real structure data not found at {STRUCTURES}"
)


def _index() -> list[dict]:
    with open(STRUCTURES / "index.jsonl") as f:
        return [json.loads(line) for line in f]


def _assert_same_chain(a: ProteinChain, b: ProteinChain, coord_atol: float = 0.0, b_atol: float = 0.0):
    assert a.sequence == b.sequence
    assert a.chain_id == b.chain_id
    np.testing.assert_array_equal(a.atom_mask, b.atom_mask)
    np.testing.assert_allclose(a.coords, b.coords, atol=coord_atol, rtol=0)
    np.testing.assert_array_equal(a.residue_index, b.residue_index)
    np.testing.assert_array_equal(a.insertion_code, b.insertion_code)
    np.testing.assert_array_equal(a.residue_name, b.residue_name)
    np.testing.assert_allclose(a.b_factor, b.b_factor, atol=b_atol, rtol=0)


# --- the whole test bed -------------------------------------------------------------------------


def test_every_indexed_chain_loads_with_the_index_sequence_and_backbone():
    """All 2,048 indexed chains: ~14 s of CPU on one core (gemmi's parsing is ~6 s of it).

    The index's `seq` was made with gemmi's one-letter codes, which leave modified residues as X;
    we map them to their parent (MSE -> M), so an index X may be any letter here, but only
    where the file's residue is not one of the standard amino acids.
    """
    start = time.process_time()  # CPU time: other jobs sharing the machine do not count
    rows = _index()
    parent_letters = collections.Counter()
    for row in rows:
        chain = io.load_chain(STRUCTURES / row["file"], row["chain"])
        where = f"{row['file']}:{row['chain']}"
        assert len(chain) == row["n_res"] == len(row["seq"]), where
        assert chain.n_backbone == row["n_backbone"], where
        for mine, theirs, name in zip(chain.sequence, row["seq"], chain.residue_name):
            if mine != theirs:
                assert theirs == "X" and name not in rc.RESTYPE_3TO1, (where, name, mine, theirs)
                parent_letters[f"{name}->{mine}"] += 1
        assert chain.coords.dtype == np.float32 and chain.coords.shape == (len(chain), 37, 3)
        assert np.isfinite(chain.b_factor).all(), where
    elapsed = time.process_time() - start
    assert len(rows) == 2048
    # The test bed's modified residues, now under their parent's letter.
    assert parent_letters["MSE->M"] == 165 and parent_letters["SEP->S"] == 6, parent_letters
    assert elapsed < 50, f"loading the test bed took {elapsed:.1f} CPU-seconds"


# --- real-world mess ----------------------------------------------------------------------------


def test_modified_and_unknown_residues():
    mse = io.load_chain(STRUCTURES / "biopython_tests/1A8O.cif.gz", "A")
    is_mse = mse.residue_name == "MSE"
    assert is_mse.sum() == 4
    assert set(np.array(list(mse.sequence))[is_mse]) == {"M"}
    # Selenium sits in methionine's SD slot.
    assert mse.atom_mask[is_mse, rc.ATOM37_INDEX["SD"]].all()
    assert mse.n_unknown == 0

    # An acetyl cap in the polymer has no amino-acid parent: X, counted, not an error.
    rows = [r for r in _index() if r["file"] == "theseus_examples/ldh/3ldh_A.pdb.gz"]
    ldh = io.load_chain(STRUCTURES / rows[0]["file"], rows[0]["chain"])
    assert ldh.residue_name[0] == "ACE" and ldh.sequence[0] == "X" and ldh.n_unknown == 1


def test_unknown_residue_name_becomes_x(tmp_path):
    chain = io.load_chain(STRUCTURES / "biopython_tests/1GBT.cif.gz", "A")
    text = io.to_pdb_string(chain)
    target = f"{chain.residue_name[10]} A{chain.residue_index[10]:>4d}"
    assert target in text
    path = tmp_path / "renamed.pdb"
    path.write_text(text.replace(target, f"ZZZ A{chain.residue_index[10]:>4d}"))
    loaded = io.load_chain(path, "A")
    assert loaded.sequence[10] == "X" and loaded.n_unknown == 1
    assert loaded.sequence[:10] + loaded.sequence[11:] == chain.sequence[:10] + chain.sequence[11:]


def test_alternate_locations_keep_highest_occupancy():
    path = STRUCTURES / "misc_small/kortemme_covariation_PF00254_2PPN_A_A.pdb.gz"
    chain = io.load_chain(path, "A")
    st = gemmi.read_structure(str(path))
    res = st[0]["A"]["8"][0]  # SER 8: altloc A occupancy 0.33, altloc B 0.67
    atoms = {(a.name, a.altloc): a for a in res}
    assert atoms[("OG", "A")].occ < atoms[("OG", "B")].occ
    i = int(np.flatnonzero(chain.residue_index == 8)[0])
    for name in ("CA", "OG"):
        np.testing.assert_allclose(chain.coords[i, rc.ATOM37_INDEX[name]], atoms[(name, "B")].pos.tolist(), atol=1e-4)
    # Where A wins (the usual case), A is kept.
    n_alt = 0
    for i, res in enumerate(st[0]["A"].get_polymer()):
        altlocs = {a.altloc: a.occ for a in res if a.altloc != "\0" and a.name == "CA"}
        if len(altlocs) == 2 and altlocs["A"] > altlocs["B"]:
            ca = next(a for a in res if a.name == "CA" and a.altloc == "A")
            np.testing.assert_allclose(chain.coords[i, rc.CA_IDX], ca.pos.tolist(), atol=1e-4)
            n_alt += 1
    assert n_alt > 0


def test_microheterogeneity_keeps_the_more_occupied_residue(tmp_path):
    chain = io.load_chain(STRUCTURES / "biopython_tests/1GBT.cif.gz", "A")
    lines = io.to_pdb_string(chain).splitlines()
    key = f"{chain.residue_name[20]} A{chain.residue_index[20]:>4d}"
    res_lines = [ln for ln in lines if ln.startswith("ATOM") and ln[17:26] == key]
    # Rewrite residue 20 as two conformers: itself (altloc A, 0.4) and an ALA (altloc B, 0.6) shifted by 1 Å.
    first = lines.index(res_lines[0])
    conf_a = [ln[:16] + "A" + ln[17:54] + "  0.40" + ln[60:] for ln in res_lines]
    conf_b = []
    for ln in res_lines:
        if ln[12:16].strip() in ("N", "CA", "C", "O", "CB"):
            x = float(ln[30:38]) + 1.0
            conf_b.append(ln[:16] + "BALA" + ln[20:30] + f"{x:8.3f}" + ln[38:54] + "  0.60" + ln[60:])
    new = lines[:first] + conf_a + conf_b + lines[first + len(res_lines) :]
    path = tmp_path / "micro.pdb"
    path.write_text("\n".join(new) + "\n")
    loaded = io.load_chain(path, "A")
    assert len(loaded) == len(chain)
    assert loaded.residue_name[20] == "ALA" and loaded.sequence[20] == "A"
    np.testing.assert_allclose(loaded.coords[20, rc.CA_IDX, 0], chain.coords[20, rc.CA_IDX, 0] + 1.0, atol=1e-3)
    assert loaded.sequence[:20] == chain.sequence[:20]


def test_insertion_codes_are_kept_in_order():
    chain = io.load_chain(STRUCTURES / "biopython_tests/1GBT.cif.gz", "A")
    keys = list(zip(chain.residue_index.tolist(), chain.insertion_code.tolist()))
    assert (65, "A") in keys and (221, "A") in keys
    assert keys.index((65, "A")) == keys.index((65, "")) + 1


def test_nmr_entry_uses_the_first_model():
    path = STRUCTURES / "biopython_tests/2BEG.cif.gz"
    st = gemmi.read_structure(str(path))
    assert len(st) > 1
    chain = io.load_chain(path, "A")
    first = st[0]["A"].get_polymer()
    second = st[1]["A"].get_polymer()
    ca0 = next(a for a in first[0] if a.name == "CA").pos.tolist()
    ca1 = next(a for a in second[0] if a.name == "CA").pos.tolist()
    np.testing.assert_allclose(chain.coords[0, rc.CA_IDX], ca0, atol=1e-4)
    assert not np.allclose(ca0, ca1)
    assert [c.chain_id for c in io.load_structure(path)] == list("ABCDE")


def test_nucleic_acids_waters_and_ligands_are_not_protein():
    path = STRUCTURES / "biopython_tests/1LCD.cif.gz"  # lac repressor headpiece on DNA
    st = gemmi.read_structure(str(path))
    chains = io.load_structure(path)
    assert [c.chain_id for c in chains] == ["A"]
    dna = [ch.name for ch in st[0] if ch.name != "A"]
    assert dna
    with pytest.raises(StructureError) as err:
        io.load_chain(path, dna[0])
    assert err.value.reason == StructureError.NO_PROTEIN and str(path) in str(err.value)
    # Waters are never residues of a chain.
    ldh = io.load_chain(STRUCTURES / "theseus_examples/ldh/3ldh_A.pdb.gz", "A")
    assert "HOH" not in set(ldh.residue_name)


# --- complexes ------------------------------------------------------------------------------------


def test_join_chains_puts_a_break_token_between_chains():
    chains = io.load_structure(STRUCTURES / "biopython_tests/2BEG.cif.gz")
    cx = join_chains(chains)
    n = sum(len(c) for c in chains)
    assert len(cx) == n + len(chains) - 1
    breaks = np.flatnonzero(np.array(list(cx.sequence)) == "|")
    assert len(breaks) == len(chains) - 1
    assert np.isnan(cx.coords[breaks]).all() and not cx.atom_mask[breaks].any()
    assert (cx.chain_index[breaks] == -1).all() and (cx.residue_index[breaks] == -1).all()
    assert cx.chain_ids == ("A", "B", "C", "D", "E")
    np.testing.assert_array_equal(np.unique(cx.chain_index[cx.chain_index >= 0]), np.arange(5))
    second = cx.chain_index == 1
    np.testing.assert_array_equal(cx.coords[second], chains[1].coords)
    assert "".join(np.array(list(cx.sequence))[second]) == chains[1].sequence


# --- writing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pdb", ".cif", ".pdb.gz", ".cif.gz"])
def test_write_then_read_back_identically(tmp_path, suffix):
    # MSE (selenium written back), insertion codes, blank chain id, an ACE cap.
    cases = [
        ("biopython_tests/1A8O.cif.gz", "A"),
        ("biopython_tests/1GBT.cif.gz", "A"),
        ("bm55_docking/1ACB_l_u__.pdb.gz", ""),
        ("theseus_examples/ldh/3ldh_A.pdb.gz", "A"),
    ]
    for file, chain_id in cases:
        chain = io.load_chain(STRUCTURES / file, chain_id)
        path = io.write_structure(tmp_path / f"out{suffix}", chain)
        _assert_same_chain(io.load_chain(path, chain_id), chain)
    if suffix.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            assert f.read(100)


def test_write_complex_and_model_output(tmp_path):
    chains = io.load_structure(STRUCTURES / "biopython_tests/2BEG.cif.gz")
    path = io.write_structure(tmp_path / "complex.cif", join_chains(chains))
    for a, b in zip(io.load_structure(path), chains, strict=True):
        _assert_same_chain(a, b)

    # A model's backbone output with pLDDT: arbitrary float32 coordinates round to the formats'
    # 3 decimals; pLDDT is read back from the B-factor column.
    rng = np.random.default_rng(0)
    real = chains[0]
    plddt = rng.uniform(0, 100, len(real)).astype(np.float32)
    backbone = real.backbone + rng.normal(0, 0.3, (len(real), 3, 3))
    predicted = ProteinChain.from_coords(real.sequence, backbone, b_factor=plddt)
    for suffix in (".pdb", ".cif"):
        back = io.load_chain(io.write_structure(tmp_path / f"pred{suffix}", predicted), "A")
        _assert_same_chain(back, predicted, coord_atol=6e-4, b_atol=6e-3)


def test_write_rejects_unknown_suffix(tmp_path):
    chain = io.load_chain(STRUCTURES / "biopython_tests/1A8O.cif.gz", "A")
    with pytest.raises(ValueError, match="cannot tell the format"):
        io.write_structure(tmp_path / "x.xyz", chain)


# --- bad input ----------------------------------------------------------------------------------------


def _reason(path, chain=None, **kw) -> StructureError:
    with pytest.raises(StructureError) as err:
        io.load_structure(path, chain, **kw)
    assert str(path) in str(err.value)
    if chain is not None:
        assert repr(chain) in str(err.value)
    return err.value


def test_files_that_are_not_structures(tmp_path):
    (tmp_path / "notes.pdb").write_text("these are notes, not coordinates\n")
    (tmp_path / "broken.cif").write_text("loop_\n_atom_site.id\n1\n")
    (tmp_path / "empty.cif.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "noise.pdb").write_bytes(np.random.default_rng(0).bytes(2000))
    for name in ("notes.pdb", "broken.cif", "empty.cif.gz", "noise.pdb"):
        assert _reason(tmp_path / name).reason == StructureError.NOT_A_STRUCTURE, name
    with pytest.raises(FileNotFoundError, match="no such structure file"):
        io.load_structure(tmp_path / "absent.pdb")


def test_bad_chains_raise_naming_file_and_chain(tmp_path):
    src = STRUCTURES / "biopython_tests/1GBT.cif.gz"
    chain = io.load_chain(src, "A")

    assert _reason(src, "Q").reason == StructureError.CHAIN_NOT_FOUND
    assert _reason(src, "A", max_length=100).reason == StructureError.TOO_LONG
    assert len(io.load_chain(src, "A", max_length=len(chain))) == len(chain)

    ca_only = np.full_like(chain.coords, np.nan)
    ca_only[:, rc.CA_IDX] = chain.coords[:, rc.CA_IDX]
    path = io.write_structure(tmp_path / "ca_only.pdb", ProteinChain.from_coords(chain.sequence, ca_only))
    assert _reason(path, "A").reason == StructureError.NO_BACKBONE

    # A chain that holds only waters: present, but empty of residues we can use.
    water = tmp_path / "water.pdb"
    water.write_text(
        io.to_pdb_string(chain).replace("END", "")
        + "HETATM 9001  O   HOH W   1      10.000  10.000  10.000  1.00 20.00           O\n"
        + "HETATM 9002  O   HOH W   2      13.000  10.000  10.000  1.00 20.00           O\nEND\n"
    )
    assert _reason(water, "W").reason == StructureError.EMPTY_CHAIN
    assert [c.chain_id for c in io.load_structure(water)] == ["A"]


@pytest.mark.parametrize("value", ["nan", "inf", "1e7", "-250000"])
def test_nan_and_absurd_coordinates(tmp_path, value):
    chain = io.load_chain(STRUCTURES / "biopython_tests/1A8O.cif.gz", "A")
    lines = io.to_mmcif_string(chain).splitlines()
    row = [k for k, ln in enumerate(lines) if ln.startswith("ATOM")][5]
    fields = lines[row].split()
    fields[10] = value  # _atom_site.Cartn_x
    lines[row] = " ".join(fields)
    path = tmp_path / "bad.cif"
    path.write_text("\n".join(lines) + "\n")
    err = _reason(path, "A")
    assert err.reason == StructureError.BAD_COORDINATES and "ASP 152 CG" in str(err)


def test_iter_chains_skips_and_counts_bad_ones_keeping_every_good_one(tmp_path):
    good = io.load_chain(STRUCTURES / "biopython_tests/1GBT.cif.gz", "A")
    ca_only = np.full((40, 37, 3), np.nan, np.float32)
    ca_only[:, rc.CA_IDX] = good.coords[:40, rc.CA_IDX]
    bad = ProteinChain.from_coords(good.sequence[:40], ca_only, chain_id="B")
    mixed = io.write_structure(tmp_path / "mixed.cif", [good, bad])
    (tmp_path / "junk.pdb").write_text("nothing here\n")
    items = [
        STRUCTURES / "biopython_tests/1A8O.cif.gz",
        mixed,  # chain A good, chain B without a full backbone residue
        tmp_path / "junk.pdb",
        tmp_path / "absent.cif",
        (STRUCTURES / "biopython_tests/1GBT.cif.gz", "Z"),
        (STRUCTURES / "biopython_tests/1GBT.cif.gz", "A"),
        STRUCTURES / "biopython_tests/1LCD.cif.gz",  # protein + DNA: DNA silently not protein
    ]
    skipped = collections.Counter()
    got = [(Path(c.source).name, c.chain_id) for c in io.iter_chains(items, skipped=skipped)]
    assert got == [("1A8O.cif.gz", "A"), ("mixed.cif", "A"), ("1GBT.cif.gz", "A"), ("1LCD.cif.gz", "A")]
    assert skipped == {
        StructureError.NO_BACKBONE: 1,
        StructureError.NOT_A_STRUCTURE: 1,
        "missing_file": 1,
        StructureError.CHAIN_NOT_FOUND: 1,
    }
    # read_chains gives the same verdicts per chain, for callers that list bad chains by name.
    verdicts = list(io.read_chains(mixed))
    assert isinstance(verdicts[0], ProteinChain) and verdicts[0].chain_id == "A"
    assert isinstance(verdicts[1], StructureError) and verdicts[1].chain == "B"
    assert verdicts[1].reason == StructureError.NO_BACKBONE and "'B'" in str(verdicts[1])
    too_long = collections.Counter()
    assert len(list(io.iter_chains(items[:1], max_length=50, skipped=too_long))) == 0
    assert too_long == {StructureError.TOO_LONG: 1}


def test_records_are_immutable():
    chain = io.load_chain(STRUCTURES / "biopython_tests/1A8O.cif.gz", "A")
    with pytest.raises(ValueError):
        chain.coords[0, 0, 0] = 1.0
    with pytest.raises(AttributeError):
        chain.sequence = "A"
    with pytest.raises(ValueError, match="coords must be"):
        ProteinChain.from_coords("AAA", np.zeros((2, 37, 3)))


def test_chain_name_does_not_repeat_the_chain():
    assert io.chain_name("x/1A0J.pdb", "A") == "1A0J_A"
    assert io.chain_name("x/1A0J_A.pdb.gz", "A") == "1A0J_A"
    assert io.chain_name("1A0J_A.cif", "B") == "1A0J_A_B"
    assert io.chain_name("kortemme_PF00013_1WVN_A_A.pdb.gz", "A") == "kortemme_PF00013_1WVN_A_A"
    assert io.chain_name("1abcA.pdb", "A") == "1abcA_A"  # only a whole _CHAIN suffix counts
