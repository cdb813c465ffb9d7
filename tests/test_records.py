"""ProteinRecord wire format and ArrayRecord shard I/O, on real sequences from ../shared/data."""

from __future__ import annotations

import gzip
import itertools
import json
import struct
import zlib

import numpy as np
import pytest

from esm3_jax import tokens as T
from esm3_jax.data import records as R
from tests.paths import DATA

SIDECHAINNET = DATA / "sequences" / "pdb_chains_seq_dssp8.sidechainnet.jsonl.gz"


def _real_records(n: int) -> list[R.ProteinRecord]:
    if not SIDECHAINNET.is_file():
        pytest.skip(f"real data not found at {SIDECHAINNET}")
    out = []
    with gzip.open(SIDECHAINNET, "rt") as f:
        for line in itertools.islice(f, n):
            row = json.loads(line)
            out.append(
                R.ProteinRecord(
                    id=row["id"],
                    source=SIDECHAINNET.name,
                    sequence_tokens=row["seq"],
                    ss8_tokens=T.encode_ss8(row["dssp8"], add_special_tokens=False),
                )
            )
    return out


def _full_record(base: R.ProteinRecord) -> R.ProteinRecord:
    """Every track present: the real sequence/SS8 plus the other tracks filled deterministically."""
    n = len(base)
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(n, 3, 3)).astype(np.float32) * 10
    coords[[0, n // 2]] = np.nan  # missing residues
    residues = np.zeros((n, T.RESIDUE_MAX_ANNOTATIONS), np.int32)
    residues[:, 0] = T.RESIDUE_NONE
    residues[5, :3] = [17, 230, 1477]
    return R.ProteinRecord(
        id=base.id,
        source="unit",
        sequence_tokens=base.sequence_tokens,
        structure_tokens=rng.integers(0, T.STRUCTURE_CODEBOOK_SIZE, n),
        ss8_tokens=base.ss8_tokens,
        sasa_tokens=rng.integers(3, T.SASA_VOCAB_SIZE, n),
        function_tokens=rng.integers(0, T.FUNCTION_VOCAB_SIZE, (n, T.FUNCTION_DEPTH)),
        residue_annotation_tokens=residues,
        plddt=rng.random(n).astype(np.float32),
        coordinates=coords,
        chain_id=(np.arange(n) >= n // 2).astype(np.int32),
    )


def test_round_trip_real_and_full_records():
    recs = _real_records(50)
    for rec in recs:
        back = R.deserialize(R.serialize(rec))
        assert back == rec
        assert back.structure_tokens is None and back.coordinates is None
        assert back.sequence_tokens.dtype == np.uint8 and back.ss8_tokens.dtype == np.uint8
    full = _full_record(recs[0])
    back = R.deserialize(R.serialize(full))
    assert back == full
    assert np.isnan(back.coordinates[0]).all() and np.isfinite(back.coordinates[1]).all()
    assert back.residue_annotation_tokens.shape == (len(full), T.RESIDUE_MAX_ANNOTATIONS)
    assert back.residue_annotation_tokens[5, :3].tolist() == [17, 230, 1477]


def test_absent_tracks_cost_nothing_and_sparse_annotations_are_compact():
    rec = _real_records(1)[0]
    n, id_len, src_len = len(rec), len(rec.id.encode()), len(rec.source.encode())
    header = 3 + 1 + 4 + 2 + 2 + 2
    assert len(R.serialize(rec)) == header + id_len + src_len + n + n + 4  # sequence u8 + ss8 u8 + crc
    # One label slot in use: stored at depth 1 (2 bytes a residue), not 16 (32 bytes a residue).
    labels = np.zeros((n, T.RESIDUE_MAX_ANNOTATIONS), np.int32)
    labels[:, 0] = T.RESIDUE_NONE
    with_labels = R.ProteinRecord(id=rec.id, source=rec.source, sequence_tokens=rec.sequence_tokens,
                                  ss8_tokens=rec.ss8_tokens, residue_annotation_tokens=labels)
    assert len(R.serialize(with_labels)) == len(R.serialize(rec)) + 1 + 2 * n
    # A label in a late slot behind empty ones is kept, not trimmed away.
    labels[3, 9] = 42
    gap = R.ProteinRecord(id="gap", sequence_tokens=rec.sequence_tokens, residue_annotation_tokens=labels)
    assert R.deserialize(R.serialize(gap)).residue_annotation_tokens[3, 9] == 42


def _reforge(data: bytes, **header) -> bytes:
    """Rewrite header fields of valid record bytes and fix the checksum, so only that field is wrong."""
    fields = dict(zip(("magic", "version", "n", "mask", "id_len", "src_len"), R._HEADER.unpack_from(data, 0)))
    fields.update(header)
    body = R._HEADER.pack(*fields.values()) + data[R._HEADER.size : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_malformed_bytes_raise_record_format_error():
    rec = _real_records(1)[0]
    good = R.serialize(rec)
    n = len(rec)
    bad = {
        "empty": b"",
        "truncated header": good[:7],
        "truncated body": good[: len(good) // 2],
        "one byte short": good[:-1],
        "one byte extra": good + b"\0",
        "bit flip": good[:20] + bytes([good[20] ^ 1]) + good[21:],
        "wrong magic": _reforge(good, magic=b"XYZ"),
        "future version": _reforge(good, version=R.FORMAT_VERSION + 1),
        "header length longer than tracks": _reforge(good, n=n + 1),
        "header length shorter than tracks": _reforge(good, n=n - 1),
        "unknown track bit": _reforge(good, mask=1 << 15 | 1),
        "no sequence track": _reforge(good, mask=1 << 2),
        # SS8 payload one residue shorter than the sequence's: the tracks disagree on L.
        "track length mismatch": _with_crc(good[: -4 - 1]),
        "id not utf-8": _with_crc(
            R._HEADER.pack(b"E3R", R.FORMAT_VERSION, 1, 1, 1, 0) + b"\xff" + bytes([4])
        ),
        "sequence id out of vocabulary": _with_crc(
            R._HEADER.pack(b"E3R", R.FORMAT_VERSION, 1, 1, 0, 0) + bytes([60])
        ),
    }
    messages = {}
    for what, data in bad.items():
        try:
            R.deserialize(data)
        except R.RecordFormatError as e:
            messages[what] = str(e)
    assert sorted(messages) == sorted(bad), f"accepted: {sorted(set(bad) - set(messages))}"
    assert "version 2" in messages["future version"]
    assert "checksum" in messages["bit flip"]
    assert "outside" in messages["sequence id out of vocabulary"]


def test_record_validation_names_the_problem():
    with pytest.raises(R.RecordFormatError, match="ss8_tokens has shape"):
        R.ProteinRecord(id="p", sequence_tokens="MKV", ss8_tokens=np.array([3, 4]))
    with pytest.raises(R.RecordFormatError, match="structure_tokens holds ids outside"):
        R.ProteinRecord(id="p", sequence_tokens="MKV", structure_tokens=np.array([1, 2, 5000]))
    with pytest.raises(R.RecordFormatError, match="plddt must be in \\[0, 1\\]"):
        R.ProteinRecord(id="p", sequence_tokens="MKV", plddt=np.array([90.0, 85.0, np.nan]))
    with pytest.raises(R.RecordFormatError, match="chain_id values"):
        R.ProteinRecord(id="p", sequence_tokens="MKV", chain_id=np.array([0, -1, 1]))
    with pytest.raises(T.TokenError):
        R.ProteinRecord(id="p", sequence_tokens="MK?")


def test_write_shards_and_read_back(tmp_path):
    recs = _real_records(300)
    paths = R.write_shards(iter(recs), tmp_path / "ds", records_per_shard=128)
    assert [p.name for p in paths] == [f"records-{i:05d}-of-00003.array_record" for i in range(3)]
    assert not list((tmp_path / "ds").glob(".*partial"))
    assert R.list_shards(tmp_path / "ds") == paths
    reader = R.RecordReader(tmp_path / "ds")
    assert len(reader) == 300
    assert all(a == b for a, b in zip(reader, recs))
    assert reader[299] == recs[299]
    with pytest.raises(FileNotFoundError, match="no \\*.array_record shards"):
        R.list_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        R.list_shards(tmp_path / "missing")
