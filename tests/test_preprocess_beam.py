"""`esm3-jax preprocess --runner direct`: the Beam pipeline writes what the local path writes, byte for
byte (shards, manifest, rejects, progress), with several workers; rejects the same bad inputs for the
same reasons; resumes only missing shards; joins tracks of several inputs by record id."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from esm3_jax import cli  # noqa: E402
from esm3_jax import tokens as T  # noqa: E402
from esm3_jax.data import preprocess as pp  # noqa: E402
from esm3_jax.data import preprocess_beam as pb  # noqa: E402
from esm3_jax.data import records  # noqa: E402
from tests.paths import DATA, DEMO, STRUCTURES  # noqa: E402
from tests.test_preprocess import BAD_FASTA, BAD_JSONL_LINES, GOOD_JSONL, NO_BACKBONE_PDB  # noqa: E402

# In-process workers (threads): fast to start, and a test can count what they do.
THREADS = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
SHARED_STRUCTURES = ("biopython_tests/1A8O.cif.gz", "biopython_tests/1LCD.cif.gz")  # 1LCD: a DNA chain too
DEMO_STRUCTURES = ("1zfd.pdb.gz", "1ard.pdb.gz")


def _need(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"{p} not found (../shared/data absent)")
    if shutil.which("mkdssp") is None:
        pytest.skip("mkdssp not installed (apt-get install dssp)")


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file of an output folder, hidden ones included (the two paths leave the same set)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _head_lines(src_gz: Path, n: int, out: Path) -> Path:
    with gzip.open(src_gz, "rt") as f:
        out.write_text("".join(itertools.islice(f, n)))
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[str]:
    """Every input kind at once: demo jsonl chains and PDB files, shared mmCIF files (one with a DNA
    chain), UniProt FASTA and ScanNet residue labels."""
    _need(STRUCTURES / SHARED_STRUCTURES[0], DATA / "sequences")
    d = tmp_path_factory.mktemp("mixed")
    folder = d / "structures"
    (folder / "shared").mkdir(parents=True)
    for f in DEMO_STRUCTURES:
        shutil.copy(DEMO / "structures" / f, folder / f)
    for f in SHARED_STRUCTURES:
        shutil.copy(STRUCTURES / f, folder / "shared" / Path(f).name)
    jsonl = _head_lines(DEMO / "pdb_chains_valid.jsonl.gz", 12, d / "chains.jsonl")
    fasta = _head_lines(DATA / "sequences" / "uniprot_mmseqs2_example_QUERY.fasta.gz", 80, d / "query.fasta")
    labels = _head_lines(DATA / "annotations" / "scannet_ppbs" / "labels_validation_70.txt.gz", 200, d / "labels.txt")
    return [str(jsonl), str(folder), str(fasta), "--residue-labels", str(labels), "--records-per-shard", "5"]


def test_beam_on_several_workers_writes_the_local_bytes(tmp_path, mixed, capsys, monkeypatch):
    monkeypatch.setattr(pb, "_FILES_PER_TASK", 3)  # the structure folder's listing read in two chunks
    assert cli.main(["preprocess", *mixed, "-o", str(tmp_path / "local"), "-j", "1", "--no-progress"]) == 0
    local_summary = capsys.readouterr().out.splitlines()[-1]
    assert cli.main(["preprocess", *mixed, "-o", str(tmp_path / "beam"), "--runner", "direct", *THREADS]) == 0
    beam_summary = capsys.readouterr().out.splitlines()[-1]
    assert beam_summary.replace("/beam", "/local") == local_summary
    local, beam = _outputs(tmp_path / "local"), _outputs(tmp_path / "beam")
    assert sorted(beam) == sorted(local) and beam == local
    manifest = json.loads(local[pp.MANIFEST])
    assert len(manifest["shards"]) >= 8 and manifest["n_records"] > 40, manifest
    assert all(manifest["tracks"][t] > 0 for t in ("coordinates", "ss8_tokens", "residue_annotation_tokens"))
    assert [s["kind"] for s in manifest["sources"]] == ["jsonl", "structure_dir", "fasta", "residue_labels"]
    assert len(records.RecordReader(tmp_path / "beam")) == manifest["n_records"]  # the Grain source reads it


# --- bad inputs ---------------------------------------------------------------------------------------------


@pytest.fixture
def bad_corpus(tmp_path) -> tuple[pp.Settings, dict[str, str]]:
    """test_preprocess's malformed corpus plus broken files of every sort: truncated (.gz and plain),
    empty, binary, NaN coordinates, a structure without protein, a cut FASTA.gz. -> (settings, the
    reject reason expected of each bad file)."""
    _need(STRUCTURES / SHARED_STRUCTURES[0])
    gemmi = pytest.importorskip("gemmi")
    fasta = tmp_path / "in.fasta"
    fasta.write_text(BAD_FASTA)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join([json.dumps(r) for r in GOOD_JSONL] + BAD_JSONL_LINES) + "\n")
    st = tmp_path / "structures"
    st.mkdir()
    (st / "garbage.pdb").write_text("this is not a structure\nATOM  garbage\n")
    (st / "ca_only.pdb").write_text(NO_BACKBONE_PDB)
    shutil.copy(STRUCTURES / SHARED_STRUCTURES[0], st / "good.cif.gz")
    whole = (st / "good.cif.gz").read_bytes()
    (st / "cut.cif.gz").write_bytes(whole[: len(whole) // 3])
    (st / "cut_text.cif").write_bytes(gzip.decompress(whole)[:20000])
    (st / "empty.pdb").write_bytes(b"")
    (st / "binary.pdb").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    pdb_text = gzip.decompress((DEMO / "structures" / "1ard.pdb.gz").read_bytes()).decode().splitlines()
    nan_lines = [
        line[:30] + f"{'nan':>8}" * 3 + line[54:] if line.startswith("ATOM") and n % 2 else line
        for n, line in enumerate(pdb_text)
    ]
    (st / "nan_coords.pdb").write_text("\n".join(nan_lines) + "\n")
    dna = gemmi.read_structure(str(STRUCTURES / SHARED_STRUCTURES[1]))
    dna.setup_entities()
    for model in dna:
        for name in [ch.name for ch in model if ch.get_polymer().check_polymer_type() != gemmi.PolymerType.Dna]:
            model.remove_chain(name)
    dna.make_mmcif_document().write_file(str(st / "dna_only.cif"))
    fasta_text = gzip.decompress((DATA / "sequences" / "uniprot_mmseqs2_example_QUERY.fasta.gz").read_bytes())
    cut_fasta = tmp_path / "cut.fasta.gz"
    cut_fasta.write_bytes(gzip.compress(fasta_text[:40000])[:6000])
    settings = pp.Settings(
        inputs=((str(fasta), "fasta"), (str(jsonl), "jsonl"), (str(st), "structure_dir"), (str(cut_fasta), "fasta")),
        records_per_shard=4,
        min_length=5,
    )
    expected = {
        "cut.cif.gz": "unparsable", "cut_text.cif": "unparsable", "empty.pdb": "unparsable",
        "binary.pdb": "unparsable", "nan_coords.pdb": "bad coordinates", "dna_only.cif": "no protein chains",
        "garbage.pdb": "unparsable", "ca_only.pdb": "no backbone", "cut.fasta.gz": "truncated",
    }  # fmt: skip
    return settings, expected


def test_bad_inputs_same_rejects_and_no_good_record_lost(tmp_path, bad_corpus, monkeypatch):
    settings, expected = bad_corpus
    monkeypatch.setattr(pb, "_FILES_PER_TASK", 2)
    local = pp.run(settings, tmp_path / "local", progress=False)
    beam = pb.run(settings, str(tmp_path / "beam"), beam_args=THREADS)
    assert beam == local
    assert _outputs(tmp_path / "beam") == _outputs(tmp_path / "local")

    rejects = [json.loads(line) for line in (tmp_path / "beam" / pp.REJECTS).read_text().splitlines()]
    by_file = {r["source"].split(":")[0].rsplit("/", 1)[-1]: r["reason"] for r in rejects}
    assert {f: by_file.get(f) for f in expected} == expected
    assert all(r["detail"] for r in rejects)
    # Every good record of the corpus is there: test_preprocess's six, the good structure's chain, and
    # the FASTA records the cut file held whole.
    ids = [r.id for r in records.RecordReader(tmp_path / "beam")]
    assert ids[:6] == ["sp|good1", "good2", "good3", "j_good", "j_good_coil_dialects", "good_A"]
    n_whole = sum(1 for r in ids[6:])
    assert n_whole >= 5 and local["sources"][3] == {
        "path": settings.inputs[3][0], "kind": "fasta", "n_records": n_whole, "n_rejected": 1,
    }  # fmt: skip


# --- resume ---------------------------------------------------------------------------------------------------


@pytest.fixture
def sequences(tmp_path) -> pp.Settings:
    _need(DATA / "sequences")
    fasta = _head_lines(DATA / "sequences" / "uniprot_mmseqs2_example_QUERY.fasta.gz", 200, tmp_path / "q.fasta")
    jsonl = _head_lines(DEMO / "pdb_chains_valid.jsonl.gz", 30, tmp_path / "chains.jsonl")
    return pp.Settings(inputs=((str(fasta), "fasta"), (str(jsonl), "jsonl")), records_per_shard=10)


_WRITE_SHARD_FILE = pp.write_shard_file


def _count_shard_writes(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Which shards the (in-process) workers write; with `fail_at`, that shard's worker dies."""
    written: list[int] = []
    original = _WRITE_SHARD_FILE

    def wrapped(path, outcomes):
        index = int(Path(path).name.split("-")[1].split(".")[0])
        if index == fail_at:
            raise RuntimeError(f"worker lost while writing shard {index}")
        written.append(index)
        return original(path, outcomes)

    monkeypatch.setattr(pp, "write_shard_file", wrapped)
    return written


def test_resume_redoes_only_missing_shards_whichever_path_began(tmp_path, sequences, monkeypatch):
    clean = tmp_path / "clean"
    pp.run(sequences, clean, progress=False)
    n_shards = len(list(clean.glob(f"*{records.SHARD_SUFFIX}")))
    assert n_shards >= 4

    # A local run's folder, with one shard gone and one damaged: Beam finishes it.
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    (out / pp.shard_name(1)).unlink()
    damaged = out / pp.shard_name(3)
    damaged.write_bytes(damaged.read_bytes()[:-10])
    written = _count_shard_writes(monkeypatch)
    pb.run(sequences, str(out), beam_args=THREADS)
    assert sorted(written) == [1, 3]
    assert _outputs(out) == _outputs(clean)

    # A Beam run that loses a worker: the shards finished before are kept, the rest redone.
    out2 = tmp_path / "out2"
    _count_shard_writes(monkeypatch, fail_at=2)
    with pytest.raises(Exception, match="worker lost while writing shard 2"):
        pb.run(sequences, str(out2), beam_args=THREADS)
    assert not (out2 / pp.MANIFEST).exists()
    finished = sorted(int(p.name[6:11]) for p in (out2 / pb.PROGRESS_DIR).glob("*.json"))
    assert 2 not in finished
    written = _count_shard_writes(monkeypatch)
    pb.run(sequences, str(out2), beam_args=THREADS)
    assert sorted(written) == sorted(set(range(n_shards)) - set(finished))
    assert _outputs(out2) == _outputs(clean)

    other = pp.Settings(inputs=sequences.inputs, records_per_shard=7)
    with pytest.raises(pp.PreprocessError, match="different inputs or settings"):
        pb.run(other, str(out2), beam_args=THREADS)


# --- joining tracks by record id --------------------------------------------------------------------------------


def test_join_merges_tracks_of_one_id_and_counts_the_unmatched(tmp_path):
    """A FASTA sequence + its structure (another input) + its residue labels (a third) -> one record."""
    _need(DEMO / "structures")
    folder = tmp_path / "structures"
    folder.mkdir()
    for f in (*DEMO_STRUCTURES, "5znf.pdb.gz"):
        shutil.copy(DEMO / "structures" / f, folder / f)
    plain = tmp_path / "plain"
    pp.run(pp.Settings(inputs=((str(folder), "structure_dir"),)), plain, progress=False)
    chains = {r.id: r for r in records.RecordReader(plain)}
    first, second, third = sorted(chains)
    seq = {rid: T.decode_sequence(r.sequence_tokens, strip_special=False) for rid, r in chains.items()}
    fasta = tmp_path / "seqs.fasta"
    fasta.write_text(
        f">{first} matches a structure\n{seq[first]}\n"
        f">{second} one residue changed\n{'W' + seq[second][1:] if seq[second][0] != 'W' else 'A' + seq[second][1:]}\n"
        ">lonely no structure has this id\nMKTAYIAKQRQISFVKSHFSRQ\n"
    )
    labels = tmp_path / "labels.txt"
    labels.write_text(f">{first}\n" + "".join(f"A {i} {aa} {i % 2}\n" for i, aa in enumerate(seq[first], 1)))
    settings = pp.Settings(
        inputs=((str(fasta), "fasta"), (str(folder), "structure_dir"), (str(labels), "residue_labels")),
        records_per_shard=2,
    )
    manifest = pb.run(settings, str(tmp_path / "joined"), beam_args=THREADS, join=True)
    got = {r.id: r for r in records.RecordReader(tmp_path / "joined")}
    assert sorted(got) == sorted({first, third, "lonely"})
    merged, structure = got[first], chains[first]
    for track in ("sequence_tokens", "coordinates", "ss8_tokens", "sasa_tokens", "plddt"):
        np.testing.assert_array_equal(getattr(merged, track), getattr(structure, track))
    np.testing.assert_array_equal(merged.residue_annotation_tokens[:, 0] == 4, np.arange(1, len(merged) + 1) % 2 == 1)
    assert merged.source == f"{fasta}:1 + {structure.source} + {labels}:1"
    rejects = [json.loads(line) for line in (tmp_path / "joined" / pp.REJECTS).read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [(second, "join mismatch")]
    assert manifest["join"] == {
        "matched_ids": 2,  # the mismatched pair was matched too
        "unmatched": [
            {"path": str(fasta), "n_unmatched": 1},
            {"path": str(folder), "n_unmatched": 1},
            {"path": str(labels), "n_unmatched": 0},
        ],
    }
    # The merged record counts for each input it came from; the rejected one too.
    assert [(s["n_records"], s["n_rejected"]) for s in manifest["sources"]] == [(2, 1), (2, 1), (1, 0)]

    # Nothing to join: the shards a plain run writes.
    alone = pb.run(pp.Settings(inputs=((str(folder), "structure_dir"),)), str(tmp_path / "alone"), beam_args=THREADS, join=True)
    assert alone["shards"] == json.loads((plain / pp.MANIFEST).read_text())["shards"]


def test_beam_options_need_a_runner(tmp_path, capsys):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    assert cli.main(["preprocess", str(fasta), "-o", str(tmp_path / "o"), "--direct_num_workers=2"]) == 2
    assert "--direct_num_workers=2 (Beam pipeline options and --join go with --runner)" in capsys.readouterr().err
    # Two worker processes (-j 2 with the direct runner: multi_processing), two shards.
    common = ["preprocess", str(fasta), str(fasta), "--records-per-shard", "1"]
    assert cli.main(common + ["-o", str(tmp_path / "beam"), "--runner", "direct", "-j", "2"]) == 0
    assert "2 records (24 tokens) in 2 shards; 0 rejected" in capsys.readouterr().out
    assert cli.main(common + ["-o", str(tmp_path / "local"), "-j", "1", "--no-progress"]) == 0
    assert _outputs(tmp_path / "beam") == _outputs(tmp_path / "local")


# --- inputs and outputs on an object store ------------------------------------------------------------------------


def _object_store(root: Path):
    """A Beam filesystem `esm3test://` kept in a local folder, without folders of its own (as gs:// or
    s3:// have none): what the pipeline does for object stores, in-process and offline."""
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.io.localfilesystem import LocalFileSystem

    prefix = "esm3test://"

    class ObjectStore(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "esm3test"

        def _local(self, path):
            return str(root / path[len(prefix) :])

        def _remote(self, path):
            return prefix + str(Path(path).relative_to(root))

        def join(self, base, *paths):
            return "/".join([base.rstrip("/"), *(p.strip("/") for p in paths)])

        def split(self, path):
            head, _, tail = path.rstrip("/").rpartition("/")
            return head, tail

        def has_dirs(self):
            return False

        def mkdirs(self, path):
            pass

        def _list(self, dir_or_prefix):
            for f in sorted(root.rglob("*")):
                if f.is_file() and self._remote(str(f)).startswith(dir_or_prefix):
                    yield self.metadata(self._remote(str(f)))

        def metadata(self, path):
            stat = Path(self._local(path)).stat()
            return FileMetadata(path, stat.st_size, stat.st_mtime)

        def create(self, path, *args, **kwargs):
            Path(self._local(path)).parent.mkdir(parents=True, exist_ok=True)
            return super().create(self._local(path), *args, **kwargs)

        def open(self, path, *args, **kwargs):
            return super().open(self._local(path), *args, **kwargs)

        def rename(self, sources, destinations):
            for a, b in zip(sources, destinations):
                Path(self._local(a)).replace(self._local(b))

        def exists(self, path):
            return Path(self._local(path)).is_file()

        def delete(self, paths):
            for p in paths:
                Path(self._local(p)).unlink()

    return ObjectStore, prefix


def test_inputs_and_outputs_on_an_object_store(tmp_path, mixed):
    store, prefix = _object_store(tmp_path / "store")
    folder = tmp_path / "store" / "in"
    folder.mkdir(parents=True)
    jsonl, structures, fasta, _, labels, *_ = mixed
    (folder / "structures").mkdir()
    for f in DEMO_STRUCTURES:
        shutil.copy(Path(structures) / f, folder / "structures" / f)
    shutil.copy(jsonl, folder / "chains.jsonl")
    (folder / "query.fasta.gz").write_bytes(gzip.compress(Path(fasta).read_bytes()))
    local = pp.Settings(
        inputs=(
            (str(folder / "structures"), "structure_dir"),
            (str(folder / "chains.jsonl"), "jsonl"),
            (str(folder / "query.fasta.gz"), "fasta"),
        ),
        records_per_shard=5,
    )
    remote = pp.Settings(inputs=tuple((prefix + "in/" + Path(p).name, k) for p, k in local.inputs), records_per_shard=5)
    args = [p for p, _ in remote.inputs] + ["-o", prefix + "out", "--records-per-shard", "5", "--runner", "direct"]
    assert [pb.input_kind(p) for p, _ in remote.inputs] == ["structure_dir", "jsonl", "fasta"]
    assert cli.main(["preprocess", *args, *THREADS]) == 0
    pp.run(local, tmp_path / "local", progress=False)

    got, want = records.RecordReader(tmp_path / "store" / "out"), records.RecordReader(tmp_path / "local")
    assert len(got) == len(want) > 20
    for a, b in zip(got, want):
        assert a.source.replace(prefix, str(tmp_path / "store") + "/") == b.source
        assert a == records.ProteinRecord(**{**b.__dict__, "source": a.source})
    manifest = json.loads((tmp_path / "store" / "out" / pp.MANIFEST).read_text())
    assert [s["n_records"] for s in manifest["sources"]] == [
        s["n_records"] for s in json.loads((tmp_path / "local" / pp.MANIFEST).read_text())["sources"]
    ]
    hidden = [p for p in (tmp_path / "store" / "out").rglob("*") if p.is_file() and p.name.startswith(".")]
    assert not hidden  # no partial shard, no progress lines left beside progress.jsonl
