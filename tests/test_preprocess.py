"""`esm3-jax preprocess`: rejects with reasons, determinism across worker counts, resume, real data."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from esm3_jax import cli
from esm3_jax import tokens as T
from esm3_jax.data import function_tokens as ft
from esm3_jax.data import preprocess as pp
from esm3_jax.data import records
from esm3_jax.data import sources as src
from esm3_jax.structure.chain import ProteinChain
from tests.paths import DATA, STRUCTURES

SEQUENCES = DATA / "sequences"
SCOPE_DES = DATA / "annotations" / "scope" / "scope_2.07_dir.des.txt.gz"
SCANNET = DATA / "annotations" / "scannet_ppbs" / "labels_validation_70.txt.gz"
# Small real chains, all in SCOPe: HIV capsid (a.28.3.1), BPTI (g.8.1.1), a two-domain chain (4CUP A:
# l.1.1.1 over residues 1856-1857, a.29.2.0 over 1858-1970), and a DNA-protein complex (1LCD; its DNA
# chains are skipped silently).
STRUCTURE_FILES = (
    "biopython_tests/1A8O.cif.gz",
    "mdanalysis_mmcif/5PTI.cif.gz",
    "biopython_tests/4CUP.cif.gz",
    "biopython_tests/1LCD.cif.gz",
)


def _need_data(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"{p} not found (../shared/data absent)")


def _head_lines(src_gz: Path, n: int, out: Path) -> Path:
    with gzip.open(src_gz, "rt") as f:
        out.write_text("".join(itertools.islice(f, n)))
    return out


def _read(out_dir: Path) -> list[records.ProteinRecord]:
    return list(records.RecordReader(out_dir))


def _rejects(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / pp.REJECTS).read_text().splitlines()]


def _shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.glob(f"*{records.SHARD_SUFFIX}"))}


# --- a malformed corpus --------------------------------------------------------------------------------

GOOD_FASTA = {"sp|good1": "MKTAYIAKQRQISFVKSHFSRQ", "good2": "mktayiakqr", "good3": "GSHMLEDPVDAFQ*"}
BAD_FASTA = """\
stray sequence text before any header
>sp|good1 first good record
MKTAYIAKQR
QISFVKSHFSRQ
>bad_letters contains a digit and a hash
MKTA1YIAK#QR
>empty
>good2 lower case is soft-masking, kept
mktayiakqr
>short
MKV
>good3 trailing stop codon
GSHMLEDPVDAFQ*
"""
GOOD_JSONL = [
    {"id": "j_good", "seq": "MKTAYIAKQR", "dssp8": "LLHHHHHHLL"},
    {"id": "j_good_coil_dialects", "seq": "GSHMLEDP", "dssp8": "-LC TTSS"},
]
BAD_JSONL_LINES = [
    json.dumps({"id": "j_mismatch", "seq": "MKTAYIAKQR", "dssp8": "LLHHHH"}),
    json.dumps({"id": "j_bad_ss", "seq": "MKTAYIAKQR", "dssp8": "LLHHQQHHLL"}),
    json.dumps({"id": "j_no_seq", "dssp8": "LLHH"}),
    '{"id": "j_broken", "seq": "MKTA',
    json.dumps({"id": "j_bad_letters", "seq": "MKTAYIAK-R", "dssp8": "LLHHHHHHLL"}),
]
NO_BACKBONE_PDB = "".join(  # eight CA-only glycines: a chain without a single N-CA-C backbone
    f"ATOM  {i:5d}  CA  GLY A{i:4d}    {3.8 * i:8.3f}{0.0:8.3f}{0.0:8.3f}  1.00 20.00           C\n"
    for i in range(1, 9)
) + "END\n"


@pytest.fixture
def malformed(tmp_path) -> tuple[pp.Settings, dict]:
    fasta = tmp_path / "in.fasta"
    fasta.write_text(BAD_FASTA)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join([json.dumps(r) for r in GOOD_JSONL] + BAD_JSONL_LINES) + "\n")
    structures = tmp_path / "structures"
    structures.mkdir()
    (structures / "garbage.pdb").write_text("this is not a structure\nATOM  garbage\n")
    (structures / "ca_only.pdb").write_text(NO_BACKBONE_PDB)
    labels = tmp_path / "labels.txt"
    labels.write_text(">1abc_0-A\nA 1 M 0\nA 2 K 1\nA 3 T 1\nA 4 A 0\nA 5 Y 0\n>2xyz_0-B\nB 1 M 0\nB 2 K 7\n")
    settings = pp.Settings(
        inputs=(
            (str(fasta), "fasta"),
            (str(jsonl), "jsonl"),
            (str(structures), "structure_dir"),
            (str(labels), "residue_labels"),
        ),
        records_per_shard=4,
        min_length=5,
    )
    expected_rejects = {
        (f"{fasta}:1", "unparsable"),
        (f"{fasta}:5", "unknown letters"),
        (f"{fasta}:7", "empty"),
        (f"{fasta}:10", "too short"),
        (f"{jsonl}:3", "length mismatch"),
        (f"{jsonl}:4", "unknown letters"),
        (f"{jsonl}:5", "unparsable"),
        (f"{jsonl}:6", "unparsable"),
        (f"{jsonl}:7", "unknown letters"),
        (str(structures / "ca_only.pdb"), "no backbone"),
        (str(structures / "garbage.pdb"), "unparsable"),
        (f"{labels}:7", "unparsable"),
    }
    return settings, expected_rejects


def test_malformed_corpus_keeps_every_good_record_and_lists_every_bad_one(tmp_path, malformed):
    settings, expected_rejects = malformed
    out = tmp_path / "out"
    manifest = pp.run(settings, out, progress=False)

    got = _read(out)
    assert [r.id for r in got] == ["sp|good1", "good2", "good3", "j_good", "j_good_coil_dialects", "1abc_0-A"]
    assert T.decode_sequence(got[0].sequence_tokens, strip_special=False) == GOOD_FASTA["sp|good1"]
    assert T.decode_sequence(got[1].sequence_tokens, strip_special=False) == "MKTAYIAKQR"
    assert T.decode_sequence(got[2].sequence_tokens, strip_special=False) == "GSHMLEDPVDAFQ"
    assert T.decode_ss8(got[4].ss8_tokens, strip_special=False) == "CCCCTTSS"
    # Residue labels: label 1 -> the PPI id, label 0 -> <none>.
    np.testing.assert_array_equal(got[5].residue_annotation_tokens[:, 0], [3, 4, 4, 3, 3])
    assert not got[5].residue_annotation_tokens[:, 1:].any()

    rejects = _rejects(out)
    assert {(r["source"], r["reason"]) for r in rejects} == expected_rejects
    ids = {r["source"].rsplit("/", 1)[-1]: r["id"] for r in rejects}
    assert ids["in.jsonl:3"] == "j_mismatch" and ids["in.fasta:5"] == "bad_letters"
    assert ids["ca_only.pdb"] == "ca_only_A"
    assert len(rejects) == len(expected_rejects)
    assert all(r["detail"] for r in rejects)
    assert manifest["n_records"] == 6 and manifest["n_rejected"] == 12
    assert manifest["rejected_by_reason"] == {
        "empty": 1, "length mismatch": 1, "no backbone": 1, "too short": 1, "unknown letters": 3, "unparsable": 5,
    }  # fmt: skip
    assert [(s["n_records"], s["n_rejected"]) for s in manifest["sources"]] == [(3, 4), (2, 5), (0, 2), (1, 1)]
    assert manifest["tracks"]["ss8_tokens"] == 2 and manifest["tracks"]["residue_annotation_tokens"] == 1
    assert manifest["n_tokens"] == manifest["n_residues"] + 2 * 6 == 22 + 10 + 13 + 10 + 8 + 5 + 12
    assert json.loads((out / pp.MANIFEST).read_text())["n_records"] == 6
    for shard in manifest["shards"]:
        assert shard["sha256"] == pp._sha256(out / shard["file"])


def test_structure_record_ids_name_the_chain_once(tmp_path):
    """A file already named for its chain (1xyz_A.pdb) gives chain A the id 1xyz_A, as `fold`
    names its output; other files get FILE_CHAIN."""
    for name, expected in (("1xyz_A.pdb", "1xyz_A"), ("1xyz.pdb", "1xyz_A"), ("1xyz_B.pdb", "1xyz_B_A")):
        (tmp_path / name).write_text(NO_BACKBONE_PDB)
        [rejected] = src.parse_entry(src.Entry("structure", str(tmp_path / name), str(tmp_path / name)), src.ParseOptions())
        assert (rejected.reason, rejected.record_id) == ("no backbone", expected)


def test_everything_rejected_fails_loudly(tmp_path, capsys):
    fasta = tmp_path / "bad.fasta"
    fasta.write_text(">a\nMK1\n>b\n\n")
    rc = cli.main(["preprocess", str(fasta), "-o", str(tmp_path / "out"), "-j", "1", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "every one of 2 proteins was rejected" in err and "1 empty, 1 unknown letters" in err
    assert len(_rejects(tmp_path / "out")) == 2


def test_cli_summary_and_unknown_input_type(tmp_path, capsys):
    fasta = tmp_path / "x.fa"
    fasta.write_text(">a\nMKTAYIAKQR\n>b\nGSHM\n")
    # GSHM (4 residues) is under the default --min-length 8: kept by lowering it explicitly.
    args = ["preprocess", str(fasta), "-o", str(tmp_path / "out"), "-j", "1", "--no-progress", "--min-length", "4"]
    assert cli.main(args) == 0
    assert "2 records (18 tokens) in 1 shards; 0 rejected" in capsys.readouterr().out
    odd = tmp_path / "x.xyz"
    odd.write_text("")
    assert cli.main(["preprocess", str(odd), "-o", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "unknown input type '.xyz'" in capsys.readouterr().err
    # A pipe named like FASTA: a run reads its inputs twice (progress total, records), so refused by name.
    pipe = tmp_path / "stream.fasta"
    os.mkfifo(pipe)
    assert cli.main(["preprocess", str(pipe), "-o", str(tmp_path / "o3"), "--no-progress"]) == 2
    assert f"{pipe}: not a regular file" in capsys.readouterr().err


def test_one_residue_and_all_unknown_chains_rejected_by_default(tmp_path, capsys):
    """Default settings reject a 1-residue chain (too short) and an all-X chain (too many unknown
    residues), count both in the manifest, and keep the good record beside them; the flags move the bar."""
    fasta = tmp_path / "x.fasta"
    fasta.write_text(
        ">good\nMKTAYIAKQRQISFVKSHFSRQ\n>one\nM\n>all_x\nXXXXXXXXXXXX\n>half_x\nMKTAYIXXXXXX\n>most_x\nMKTAYXXXXXXX\n"
    )
    out = tmp_path / "out"
    manifest = pp.run(pp.Settings(inputs=((str(fasta), "fasta"),)), out, progress=False)
    assert [r.id for r in _read(out)] == ["good", "half_x"]  # exactly half X is still kept
    assert {r["id"]: r["reason"] for r in _rejects(out)} == {
        "one": "too short", "all_x": "too many unknown residues", "most_x": "too many unknown residues",
    }  # fmt: skip
    assert manifest["rejected_by_reason"] == {"too many unknown residues": 2, "too short": 1}
    assert manifest["n_records"] == 2 and manifest["n_rejected"] == 3
    assert manifest["settings"]["min_length"] == 8 and manifest["settings"]["max_unknown_fraction"] == 0.5

    args = ["preprocess", str(fasta), "-o", str(tmp_path / "o2"), "-j", "1", "--no-progress"]
    assert cli.main(args + ["--min-length", "1", "--max-unknown-fraction", "1"]) == 0
    assert "5 records" in capsys.readouterr().out
    assert cli.main(args + ["--overwrite", "--max-unknown-fraction", "1.5"]) == 2
    assert "max unknown fraction must be in [0, 1]" in capsys.readouterr().err


def test_structure_encoder_option_errors_clearly_without_the_tokenizer(tmp_path, capsys, monkeypatch):
    """No fake tokens: an installation without the structure tokenizer fails up front, clearly."""
    import esm3_jax.inference

    # As if the module were absent: hide it from the import system and from the package.
    monkeypatch.setitem(sys.modules, "esm3_jax.inference.structure_tokenizer", None)
    monkeypatch.delattr(esm3_jax.inference, "structure_tokenizer", raising=False)
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    out = tmp_path / "out"
    args = ["preprocess", str(fasta), "-o", str(out), "--structure-encoder", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 2
    assert "structure tokenizer not available" in capsys.readouterr().err
    assert not out.exists()  # failed before doing any work


# --- determinism and resume ---------------------------------------------------------------------------


@pytest.fixture
def real_sequences(tmp_path) -> pp.Settings:
    _need_data(SEQUENCES)
    jsonl = _head_lines(SEQUENCES / "pdb_chains_seq_dssp8.sidechainnet.jsonl.gz", 150, tmp_path / "chains.jsonl")
    fasta = _head_lines(SEQUENCES / "uniprot_mmseqs2_example_QUERY.fasta.gz", 300, tmp_path / "query.fasta")
    return pp.Settings(inputs=((str(fasta), "fasta"), (str(jsonl), "jsonl")), records_per_shard=40)


def test_byte_identical_across_worker_counts(tmp_path, real_sequences):
    m1 = pp.run(real_sequences, tmp_path / "w1", workers=1, progress=False)
    m2 = pp.run(real_sequences, tmp_path / "w2", workers=2, progress=False)
    assert m1["n_records"] > 250 and len(m1["shards"]) >= 6
    assert _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w2")
    assert (tmp_path / "w1" / pp.MANIFEST).read_bytes() == (tmp_path / "w2" / pp.MANIFEST).read_bytes()
    assert (tmp_path / "w1" / pp.REJECTS).read_bytes() == (tmp_path / "w2" / pp.REJECTS).read_bytes()
    assert m1 == m2


_PROCESS_SHARD = pp.process_shard


def _counting(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Record which shards `run` works on; with `fail_at`, die (like ^C) when it reaches that one."""
    calls: list[int] = []
    original = _PROCESS_SHARD

    def wrapped(out_dir, index, *args):
        if index == fail_at:
            raise KeyboardInterrupt  # the run is killed while working on this shard
        calls.append(index)
        return original(out_dir, index, *args)

    monkeypatch.setattr(pp, "process_shard", wrapped)
    return calls


def test_resume_redoes_only_missing_or_damaged_shards(tmp_path, real_sequences, monkeypatch):
    out = tmp_path / "out"
    pp.run(real_sequences, out, progress=False)
    before = _shard_bytes(out)
    (out / pp.shard_name(1)).unlink()
    damaged = out / pp.shard_name(3)
    damaged.write_bytes(damaged.read_bytes()[:-10])
    calls = _counting(monkeypatch)
    pp.run(real_sequences, out, progress=False)
    assert calls == [1, 3]
    assert _shard_bytes(out) == before


def test_resume_after_interrupted_run(tmp_path, real_sequences, monkeypatch):
    clean = tmp_path / "clean"
    pp.run(real_sequences, clean, progress=False)
    out = tmp_path / "out"
    calls = _counting(monkeypatch, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        pp.run(real_sequences, out, progress=False)
    assert calls == [0, 1, 2, 3] and not (out / pp.MANIFEST).exists()
    # Nothing of the interrupted shard is visible under a shard name.
    assert sorted(_shard_bytes(out)) == [pp.shard_name(i) for i in range(4)]
    # A kill can also land mid-write: a half-written progress line and a half-written shard.
    with open(out / pp.PROGRESS, "a") as f:
        f.write('{"shard": 4, "file": "shard-00')
    (out / f".{pp.shard_name(4)}.partial").write_bytes(b"half a shard")
    calls = _counting(monkeypatch)
    manifest = pp.run(real_sequences, out, progress=False)
    assert calls[0] == 4 and 0 not in calls
    assert _shard_bytes(out) == _shard_bytes(clean)
    assert (out / pp.MANIFEST).read_bytes() == (clean / pp.MANIFEST).read_bytes()
    assert manifest["n_records"] == len(records.RecordReader(out))


def test_resume_refuses_other_settings(tmp_path, real_sequences):
    out = tmp_path / "out"
    pp.run(real_sequences, out, progress=False)
    other = pp.Settings(inputs=real_sequences.inputs, records_per_shard=7)
    with pytest.raises(pp.PreprocessError, match="different inputs or settings"):
        pp.run(other, out, progress=False)
    manifest = pp.run(other, out, progress=False, overwrite=True)
    assert len(list(out.glob(f"*{records.SHARD_SUFFIX}"))) == len(manifest["shards"]) > 20


# --- real data, every track -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scope_files(tmp_path_factory) -> tuple[Path, Path]:
    """A function vocabulary built from the real SCOPe names, and a SCOPe des file holding those names
    plus the px rows of the test structures (the full file takes seconds to index)."""
    _need_data(SCOPE_DES)
    d = tmp_path_factory.mktemp("scope")
    pdb_ids = {Path(f).name[:4].lower() for f in STRUCTURE_FILES}  # these files' names are their PDB ids
    with gzip.open(SCOPE_DES, "rt") as f, open(d / "des.txt", "w") as out:
        for line in f:
            fields = line.split("\t")
            if len(fields) == 5 and (fields[1] in src.SCOPE_NAME_LEVELS or fields[4][:4] in pdb_ids):
                out.write(line)
    assert cli.main(["build-function-vocab", str(d / "vocab"), "--scope-des", str(d / "des.txt")]) == 0
    return d / "vocab", d / "des.txt"


def test_real_sequences_with_function_tokens_and_residue_labels(tmp_path, scope_files):
    _need_data(SEQUENCES, SCANNET)
    vocab_dir, _ = scope_files
    scope_jsonl = _head_lines(
        SEQUENCES / "scope_domains_seq_dssp8.sidechainnet.jsonl.gz", 200, tmp_path / "scope.jsonl"
    )
    fasta = _head_lines(SEQUENCES / "uniprot_mmseqs2_example_QUERY.fasta.gz", 200, tmp_path / "q.fasta")
    with gzip.open(SCANNET, "rt") as f:
        text = "".join(itertools.islice(f, 3000))
    labels = tmp_path / "ppbs.txt"
    labels.write_text(text[: text.rfind(">")])  # whole blocks only
    out = tmp_path / "out"
    rc = cli.main([
        "preprocess", str(scope_jsonl), str(fasta), "--residue-labels", str(labels), "-o", str(out),
        "--function-vocab", str(vocab_dir), "--function-from-sccs", "--records-per-shard", "64", "-j", "1",
        "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    manifest = json.loads((out / pp.MANIFEST).read_text())
    got = {r.id: r for r in _read(out)}
    vocab = ft.load_function_vocab_dir(vocab_dir)

    rows = [json.loads(line) for line in scope_jsonl.read_text().splitlines()]
    in_vocab = [r for r in rows if r["sccs"] in vocab.label_keywords]
    assert len(in_vocab) >= 150  # most SCOPe domains' families are in the vocabulary built from SCOPe
    for row in in_vocab:
        rec = got[row["id"]]
        assert T.decode_sequence(rec.sequence_tokens, strip_special=False) == row["seq"]
        np.testing.assert_array_equal(rec.ss8_tokens, T.encode_ss8(row["dssp8"], False))
        expected = np.tile(ft.hash_labels(vocab, [row["sccs"]]), (len(rec), 1))
        np.testing.assert_array_equal(rec.function_tokens, expected)
    # A domain of a family missing from the vocabulary is rejected by name, never silently unlabelled.
    for row in rows:
        if row["sccs"] not in vocab.label_keywords:
            assert row["id"] not in got
    assert manifest["rejected_by_reason"].get("bad function label", 0) == len(rows) - len(in_vocab)
    n_blocks = labels.read_text().count(">")
    n_fasta = fasta.read_text().count(">")
    assert manifest["tracks"]["residue_annotation_tokens"] == n_blocks > 5
    assert manifest["tracks"]["function_tokens"] == len(in_vocab)
    assert manifest["n_records"] == len(in_vocab) + n_fasta + n_blocks
    ppbs = [r for r in got.values() if r.has("residue_annotation_tokens")]
    frac = np.mean(np.concatenate([r.residue_annotation_tokens[:, 0] == 4 for r in ppbs]))
    assert 0.05 < frac < 0.5  # binding-site residues are a minority, as in PPBS overall (19 %)


def test_jsonl_function_labels(tmp_path, scope_files):
    vocab_dir, _ = scope_files
    rows = [
        {"id": "two_domains", "seq": "MKTAYIAKQRQISFVKSHFS", "function": [
            {"label": "a.1.1.2", "start": 1, "end": 10}, {"label": "b.1.1.1", "start": 8, "end": 20}]},
        {"id": "keyword_label", "seq": "MKTAYIAKQR", "function": [{"label": "globin", "start": 3, "end": 4}]},
        {"id": "unknown_label", "seq": "MKTAYIAKQR", "function": [{"label": "x.99.99.99", "start": 1, "end": 2}]},
        {"id": "out_of_range", "seq": "MKTAYIAKQR", "function": [{"label": "a.1.1.2", "start": 5, "end": 11}]},
        {"id": "not_a_list", "seq": "MKTAYIAKQR", "function": "a.1.1.2"},
    ]  # fmt: skip
    jsonl = tmp_path / "f.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = pp.Settings(inputs=((str(jsonl), "jsonl"),), function_vocab=str(vocab_dir))
    manifest = pp.run(settings, tmp_path / "out", progress=False)
    vocab = ft.load_function_vocab_dir(vocab_dir)
    got = {r.id: r for r in _read(tmp_path / "out")}
    two = got["two_domains"].function_tokens
    np.testing.assert_array_equal(two[0], ft.hash_labels(vocab, ["a.1.1.2"]))
    np.testing.assert_array_equal(two[8], ft.hash_labels(vocab, ["a.1.1.2", "b.1.1.1"]))
    np.testing.assert_array_equal(two[19], ft.hash_labels(vocab, ["b.1.1.1"]))
    kw = got["keyword_label"].function_tokens
    assert (kw[[0, 1, 4]] == T.FUNCTION_NONE).all() and (kw[2:4] >= T.FUNCTION_LSH_OFFSET).all()
    assert {(r["id"], r["reason"]) for r in _rejects(tmp_path / "out")} == {
        ("unknown_label", "bad function label"), ("out_of_range", "bad function label"), ("not_a_list", "unparsable"),
    }  # fmt: skip
    assert manifest["tracks"]["function_tokens"] == 2


def test_real_structures_every_track(tmp_path, scope_files):
    _need_data(STRUCTURES)
    pytest.importorskip("gemmi")
    if shutil.which("mkdssp") is None:
        pytest.skip("mkdssp not installed (apt-get install dssp)")
    from esm3_jax.structure import io as sio

    vocab_dir, des = scope_files
    folder = tmp_path / "structures"
    folder.mkdir()
    for f in STRUCTURE_FILES:
        shutil.copy(STRUCTURES / f, folder / Path(f).name)
    out = tmp_path / "out"
    settings = pp.Settings(
        inputs=((str(folder), "structure_dir"),),
        records_per_shard=2,
        function_vocab=str(vocab_dir),
        parse=src.ParseOptions(scope_domains_path=str(des)),
    )
    manifest = pp.run(settings, out, progress=False)
    got = {r.id: r for r in _read(out)}
    rows = [json.loads(line) for line in (STRUCTURES / "index.jsonl").read_text().splitlines()]
    index = {row["file"]: row for row in rows}
    for f in STRUCTURE_FILES:
        row = index[f]
        rec = got[f"{Path(f).name.split('.')[0]}_{row['chain']}"]
        seq = T.decode_sequence(rec.sequence_tokens, strip_special=False)
        # The index was built reading modified residues (MSE) as X; structure.io reads their parent.
        assert len(seq) == len(row["seq"]) and all(a == b for a, b in zip(seq, row["seq"]) if b != "X")
        assert rec.coordinates.shape == (len(rec), 3, 3)
        assert int(np.isfinite(rec.coordinates).all(axis=(1, 2)).sum()) == row["n_backbone"]
        assert (rec.plddt[np.isfinite(rec.coordinates).all(axis=(1, 2))] == 1.0).all()  # experimental
        ss8 = T.decode_ss8(rec.ss8_tokens, strip_special=False)
        assert set(ss8) <= set("GHITEBSC_") and ss8.count("_") < len(ss8)
        assert (rec.sasa_tokens >= T.SASA_FIRST_BIN).mean() > 0.9
        assert not rec.has("structure_tokens")
    # SCOPe px rows -> function tokens over each domain's residues, by author numbering.
    vocab = ft.load_function_vocab_dir(vocab_dir)
    np.testing.assert_array_equal(got["5PTI_A"].function_tokens, np.tile(ft.hash_labels(vocab, ["g.8.1.1"]), (58, 1)))
    chain = sio.load_chain(folder / "4CUP.cif.gz", "A")
    expected = np.full((len(chain), T.FUNCTION_DEPTH), T.FUNCTION_NONE)
    expected[(chain.residue_index >= 1856) & (chain.residue_index <= 1857)] = ft.hash_labels(vocab, ["l.1.1.1"])
    expected[(chain.residue_index >= 1858) & (chain.residue_index <= 1970)] = ft.hash_labels(vocab, ["a.29.2.0"])
    assert (expected[:, 0] != T.FUNCTION_NONE).sum() > 100
    np.testing.assert_array_equal(got["4CUP_A"].function_tokens, expected)
    assert manifest["tracks"]["coordinates"] == manifest["n_records"] == len(got)
    assert manifest["tracks"]["function_tokens"] == 4
    assert manifest["n_rejected"] == 0  # the DNA chain of 1LCD is not a protein: skipped, not rejected


def test_structure_tokens_from_a_vqvae_encoder_checkpoint(tmp_path):
    """--structure-encoder runs the real encoder (a small, randomly initialised one here) on each chain."""
    _need_data(STRUCTURES)
    if shutil.which("mkdssp") is None:
        pytest.skip("mkdssp not installed (apt-get install dssp)")
    import flax.linen
    import jax

    from esm3_jax.config import to_dict
    from esm3_jax.model.vqvae import EncoderConfig, StructureEncoder
    from esm3_jax.compat.params_io import save_params
    from esm3_jax.structure import io as sio
    from esm3_jax.compat.params_io import ENCODER_KIND
    from esm3_jax.inference.structure_tokenizer import StructureTokenizer

    cfg = EncoderConfig(d_model=32, v_heads=4, n_layers=1, d_out=8, n_codes=64, knn=8)
    coords = np.asarray(sio.load_structure(STRUCTURES / STRUCTURE_FILES[1])[0].backbone)[None, :16]
    init = jax.jit(StructureEncoder(cfg).init)  # eager init of the encoder takes far longer than compiling it
    variables = init(jax.random.key(0), coords, None, None, np.ones(coords.shape[:2], bool))
    variables = flax.linen.meta.unbox(variables)  # drop the logical-axis boxes, as a checkpoint does
    save_params(tmp_path / "encoder", variables, to_dict(cfg), ENCODER_KIND)

    folder = tmp_path / "structures"
    folder.mkdir()
    shutil.copy(STRUCTURES / STRUCTURE_FILES[1], folder)  # one chain: one length bucket to compile
    settings = pp.Settings(inputs=((str(folder), "structure_dir"),), structure_encoder=str(tmp_path / "encoder"))
    manifest = pp.run(settings, tmp_path / "out", progress=False)
    assert manifest["tracks"]["structure_tokens"] == manifest["n_records"] == 1
    tokenizer = StructureTokenizer.load(encoder_dir=tmp_path / "encoder")
    for rec in _read(tmp_path / "out"):
        chain = sio.load_chain(folder / f"{rec.id.rsplit('_', 1)[0]}.cif.gz", rec.id.rsplit("_", 1)[1])
        expected = tokenizer.tokenize(chain.backbone, chain.residue_index)
        np.testing.assert_array_equal(rec.structure_tokens, T.encode_structure_tokens(expected, False))
        assert len(np.unique(rec.structure_tokens)) > 1


def test_scope_ranges_map_to_author_numbering():
    """A domain over author residues 64-67 and another over 68-109 label those positions only."""
    n = 20
    chain = ProteinChain.from_coords("G" * n, np.zeros((n, 3, 3)), chain_id="A", residue_index=np.arange(60, 80))
    domains = {
        ("1xu1", "A"): [
            src.ScopeDomain("d1", "l.1.1.1", "1xu1", (("A", "64", "67"),)),
            src.ScopeDomain("d2", "g.24.1.2", "1xu1", (("A", "68", "109"),)),
            src.ScopeDomain("d3", "a.1.1.1", "1xu1", (("B", None, None),)),
        ]
    }
    got = src._scope_function(chain, "1xu1", domains)
    assert got == (ft.FunctionAnnotation("l.1.1.1", 5, 8), ft.FunctionAnnotation("g.24.1.2", 9, 20))
    assert src._scope_function(chain, "2abc", domains) is None


def test_predicted_model_plddt_from_b_factors(tmp_path):
    _need_data(STRUCTURES)
    from esm3_jax.structure import io as sio

    chain = sio.load_structure(STRUCTURES / STRUCTURE_FILES[0])[0]
    plddt = np.linspace(35.0, 95.0, len(chain)).astype(np.float32)
    model = ProteinChain.from_coords(chain.sequence, chain.coords, chain_id="A", b_factor=plddt)
    text = "TITLE     ALPHAFOLD MONOMER V2.0 PREDICTION FOR A TEST PROTEIN\n" + sio.to_pdb_string(model)
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "AF-TEST-F1-model_v4.pdb").write_text(text)
    entry = src.Entry("structure", "model", str(folder / "AF-TEST-F1-model_v4.pdb"))
    items = src.parse_entry(entry, src.ParseOptions())
    np.testing.assert_allclose(items[0].plddt, plddt / 100.0, atol=1e-3)
    experimental = src.parse_entry(entry, src.ParseOptions(plddt="one"))
    assert (experimental[0].plddt == 1.0).all()
