"""`esm3-jax split`: whole MMseqs2 clusters per split, fractions roughly kept, a clear error without mmseqs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from esm3_jax import cli
from esm3_jax.data import split as sp

AA = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
needs_mmseqs = pytest.mark.skipif(
    shutil.which("mmseqs") is None, reason="mmseqs not installed (apt-get install -y mmseqs2)"
)


def _families(n_families: int, members: int, length: int = 100, seed: int = 0) -> dict[str, str]:
    """Unrelated random sequences, each with `members - 1` copies one point mutation apart."""
    rng = np.random.default_rng(seed)
    seqs = {}
    for f in range(n_families):
        base = rng.choice(AA, length)
        for m in range(members):
            s = base.copy()
            if m:
                pos = rng.integers(length)
                s[pos] = AA[(np.flatnonzero(AA == s[pos])[0] + 1) % len(AA)]
            seqs[f"fam{f}_m{m}"] = "".join(s)
    return seqs


def _ids(path) -> list[str]:
    if path.suffix == ".jsonl":
        return [json.loads(line)["id"] for line in path.read_text().splitlines()]
    return [line[1:].split()[0] for line in path.read_text().splitlines() if line.startswith(">")]


@needs_mmseqs
def test_near_duplicates_share_a_split_and_fractions_hold(tmp_path, capsys):
    seqs = _families(150, 3)
    items = list(seqs.items())
    fasta = tmp_path / "a.fasta"  # families split across a FASTA and a jsonl input
    fasta.write_text("".join(f">{k} some description\n{v}\n" for k, v in items[::2]) + ">empty\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"id": k, "seq": v}) + "\n" for k, v in items[1::2]))
    out = tmp_path / "out"
    args = ["split", str(fasta), str(jsonl), "-o", str(out), "-j", "2", "--fractions", "0.6", "0.2", "0.2"]
    assert cli.main(args) == 0
    assert "450 sequences in 150 clusters" in capsys.readouterr().out

    where = {}
    for name in sp.SPLITS:
        for f in ("a.fasta", "b.jsonl"):
            for i in _ids(out / name / f):
                assert i not in where
                where[i] = name
    assert set(where) == set(seqs)  # every entry in exactly one split; the empty one skipped
    for f in range(150):
        assert len({where[f"fam{f}_m{m}"] for m in range(3)}) == 1

    summary = json.loads((out / sp.SPLIT_JSON).read_text())
    assert summary["n_clusters"] == 150 and summary["n_sequences"] == 450 and summary["n_skipped"] == 1
    assert summary["identity"] == 0.3 and summary["coverage"] == 0.8 and summary["tool_version"]
    clusters = {s: summary["splits"][s]["n_clusters"] for s in sp.SPLITS}
    assert sum(clusters.values()) == 150
    assert 70 <= clusters["train"] <= 110 and 15 <= clusters["valid"] <= 45 and 15 <= clusters["test"] <= 45
    assert all(summary["splits"][s]["n_sequences"] == 3 * clusters[s] for s in sp.SPLITS)

    # Preprocessing one split records the clustering in its manifest.
    valid = [str(out / "valid" / f) for f in ("a.fasta", "b.jsonl")]
    assert cli.main(["preprocess", *valid, "-o", str(tmp_path / "rec"), "-j", "1", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    assert manifest["clustering"]["split"] == "valid" and manifest["clustering"]["identity"] == 0.3
    assert manifest["clustering"]["n_clusters"] == 150 and manifest["n_records"] == 3 * clusters["valid"]
    capsys.readouterr()

    # Deterministic: the same inputs and seed give the same files; another seed moves clusters.
    assert cli.main(args[:-4] + ["-o", str(tmp_path / "again"), "--fractions", "0.6", "0.2", "0.2"]) == 0
    for name in sp.SPLITS:
        assert (tmp_path / "again" / name / "b.jsonl").read_text() == (out / name / "b.jsonl").read_text()
    assert cli.main(args + ["-o", str(tmp_path / "seed1"), "--seed", "1"]) == 0
    assert (tmp_path / "seed1" / "valid" / "a.fasta").read_text() != (out / "valid" / "a.fasta").read_text()


def test_missing_mmseqs_exits_2_with_install_hint(tmp_path, capsys, monkeypatch):
    fasta = tmp_path / "a.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without mmseqs
    assert cli.main(["split", str(fasta), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mmseqs (MMseqs2) not found" in err and "apt-get install -y mmseqs2" in err
    assert not (tmp_path / "out").exists()


def test_assign_is_a_pure_function_of_id_and_seed():
    fr = (0.8, 0.1, 0.1)
    assert sp.assign("x", 0, fr) == sp.assign("x", 0, fr)
    got = [sp.assign(f"id{i}", 3, fr) for i in range(4000)]
    assert abs(got.count("train") / 4000 - 0.8) < 0.03
    assert sp.assign("x", 0, (0.0, 0.0, 1.0)) == "test"
