"""One protein on disk: the `ProteinRecord`, its binary encoding, and ArrayRecord shard I/O.

A record holds a protein's per-residue tracks *without* BOS/EOS (the pipeline adds those after
cropping, ESM3_SPEC section 1). Every track except the sequence is optional: a FASTA protein has no
structure, a PDB chain has no function annotations, and an absent track costs zero bytes.

Wire format, version 1 (all integers little-endian):

    magic  b"E3R"          3 bytes
    version                u8
    n_residues             u32
    present-tracks bitmask u16   (bit i = _TRACKS[i] is stored)
    id length, source len  u16, u16, then the UTF-8 bytes of each
    residue depth K        u8    (only when residue_annotation_tokens is stored, see below)
    track payloads         raw arrays in _TRACKS order, fixed dtypes, C order
    crc32                  u32   of everything before it

Truncated, padded or bit-flipped bytes fail the size or CRC check; a future version fails the
version check. Residue annotations are stored at depth K = one past the last slot any residue uses
(usually 0 or 1 of the 16), and widened back to 16 on read.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from esm3_jax import tokens as T

FORMAT_VERSION = 1
_MAGIC = b"E3R"
_HEADER = struct.Struct("<3sBIHHH")  # magic, version, n_residues, bitmask, id_len, source_len
_CRC = struct.Struct("<I")
SHARD_SUFFIX = ".array_record"
# One record per ArrayRecord group so that random access (the shuffled Grain source) decodes one
# record, not a whole group. zstd: sidechainnet records shrink to ~60% for ~12 us per random read.
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:3"


class RecordFormatError(ValueError):
    """Bytes that are not a valid ProteinRecord (truncated, corrupt, wrong version, bad shapes)."""


# (field name, storage dtype, per-residue trailing shape); order fixes the bitmask bits.
_TRACKS: tuple[tuple[str, np.dtype, tuple[int, ...]], ...] = (
    ("sequence_tokens", np.dtype("<u1"), ()),
    ("structure_tokens", np.dtype("<u2"), ()),
    ("ss8_tokens", np.dtype("<u1"), ()),
    ("sasa_tokens", np.dtype("<u1"), ()),
    ("function_tokens", np.dtype("<u2"), (T.FUNCTION_DEPTH,)),
    ("residue_annotation_tokens", np.dtype("<u2"), (T.RESIDUE_MAX_ANNOTATIONS,)),
    ("plddt", np.dtype("<f4"), ()),
    ("coordinates", np.dtype("<f4"), (3, 3)),
    ("chain_id", np.dtype("<u2"), ()),
)
_TRACK_BY_NAME = {name: (dtype, shape) for name, dtype, shape in _TRACKS}
# Exclusive upper bound of the ids each token track may hold.
_VOCAB_LIMIT = {
    "sequence_tokens": len(T.SEQUENCE_VOCAB),
    "structure_tokens": T.STRUCTURE_VOCAB_SIZE,
    "ss8_tokens": T.SS8_VOCAB_SIZE,
    "sasa_tokens": T.SASA_VOCAB_SIZE,
    "function_tokens": T.FUNCTION_VOCAB_SIZE,
    "residue_annotation_tokens": T.RESIDUE_VOCAB_SIZE,
}


def sequence_to_tokens(sequence: str) -> np.ndarray:
    """One-letter residues -> sequence-track ids without BOS/EOS (raises TokenError on bad letters)."""
    return T.encode_sequence(sequence, add_special_tokens=False).astype(np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class ProteinRecord:
    """One protein's tracks, residue-aligned, without BOS/EOS. None = track absent.

    Arrays are normalised to their storage dtypes on construction (and are read-only views of the
    record bytes after `deserialize`). `sequence_tokens` also accepts a one-letter string.
    Chain breaks of a complex are ordinary positions holding SEQUENCE_CHAINBREAK ('|').
    """

    id: str
    sequence_tokens: np.ndarray  # (L,) sequence-track ids
    structure_tokens: np.ndarray | None = None  # (L,) VQ-VAE codes 0..4095 (or structure specials)
    ss8_tokens: np.ndarray | None = None  # (L,) SS8 ids
    sasa_tokens: np.ndarray | None = None  # (L,) SASA bin ids
    function_tokens: np.ndarray | None = None  # (L, 8) function ids
    residue_annotation_tokens: np.ndarray | None = None  # (L, 16) residue-annotation ids, 0-padded
    plddt: np.ndarray | None = None  # (L,) per-residue confidence in [0, 1]
    coordinates: np.ndarray | None = None  # (L, 3, 3) N, CA, C in Angstrom, NaN where missing
    chain_id: np.ndarray | None = None  # (L,) small integer per residue
    source: str = ""  # where it came from (file, database), free text

    def __post_init__(self):
        seq = self.sequence_tokens
        if isinstance(seq, str):
            object.__setattr__(self, "sequence_tokens", sequence_to_tokens(seq))
        n = len(self.sequence_tokens)
        for name, dtype, trailing in _TRACKS:
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value)
            if arr.shape != (n, *trailing):
                raise RecordFormatError(
                    f"record {self.id!r}: {name} has shape {arr.shape}, expected {(n, *trailing)}"
                )
            if name in _VOCAB_LIMIT and arr.size and (arr.min() < 0 or arr.max() >= _VOCAB_LIMIT[name]):
                raise RecordFormatError(
                    f"record {self.id!r}: {name} holds ids outside [0, {_VOCAB_LIMIT[name]})"
                )
            if name == "chain_id" and arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
                raise RecordFormatError(f"record {self.id!r}: chain_id values must be in [0, 65535]")
            if name == "plddt" and np.any(np.abs(np.asarray(arr, np.float64) - 0.5) > 0.5):
                raise RecordFormatError(
                    f"record {self.id!r}: plddt must be in [0, 1] (NaN = unknown); divide 0-100 values by 100"
                )
            if arr.dtype != dtype:
                arr = arr.astype(dtype)
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return len(self.sequence_tokens)

    def has(self, name: str) -> bool:
        return getattr(self, name) is not None

    def __eq__(self, other) -> bool:
        if not isinstance(other, ProteinRecord):
            return NotImplemented
        if (self.id, self.source) != (other.id, other.source):
            return False
        for name, _, _ in _TRACKS:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                return False
            if a is not None and not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True


def serialize(record: ProteinRecord) -> bytes:
    """Encode a record in the versioned binary format described in the module docstring."""
    id_bytes, source_bytes = record.id.encode(), record.source.encode()
    if len(id_bytes) > 0xFFFF or len(source_bytes) > 0xFFFF:
        raise RecordFormatError(f"record {record.id[:40]!r}: id or source longer than 65535 bytes")
    mask, payloads = 0, []
    for bit, (name, _, _) in enumerate(_TRACKS):
        arr = getattr(record, name)
        if arr is None:
            continue
        mask |= 1 << bit
        if name == "residue_annotation_tokens":
            # Keep slots up to the last one any residue uses (labels sit at the front of a row,
            # so this is usually 0 or 1 of 16); lossless whatever the layout.
            used_slots = np.flatnonzero((arr != T.RESIDUE_PAD).any(axis=0))
            depth = int(used_slots[-1]) + 1 if used_slots.size else 0
            payloads.append(struct.pack("<B", depth))
            arr = arr[:, :depth]
        payloads.append(np.ascontiguousarray(arr).tobytes())
    body = b"".join(
        [
            _HEADER.pack(_MAGIC, FORMAT_VERSION, len(record), mask, len(id_bytes), len(source_bytes)),
            id_bytes,
            source_bytes,
            *payloads,
        ]
    )
    return body + _CRC.pack(zlib.crc32(body))


def deserialize(data: bytes) -> ProteinRecord:
    """Decode bytes from `serialize`. Raises RecordFormatError on anything malformed."""
    view = memoryview(data)
    if len(view) < _HEADER.size + _CRC.size:
        raise RecordFormatError(f"record of {len(view)} bytes is shorter than the header")
    magic, version, n, mask, id_len, source_len = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC:
        raise RecordFormatError(f"not a ProteinRecord (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise RecordFormatError(f"record format version {version}, this code reads version {FORMAT_VERSION}")
    (crc,) = _CRC.unpack_from(view, len(view) - _CRC.size)
    if zlib.crc32(view[: len(view) - _CRC.size]) != crc:
        raise RecordFormatError("record checksum mismatch (truncated or corrupt bytes)")
    if mask >> len(_TRACKS) or not mask & 1:
        raise RecordFormatError(f"record track bitmask {mask:#x} is invalid (sequence must be present)")
    pos = _HEADER.size
    try:
        rid = bytes(view[pos : pos + id_len]).decode()
        source = bytes(view[pos + id_len : pos + id_len + source_len]).decode()
    except UnicodeDecodeError as e:
        raise RecordFormatError(f"record id/source is not UTF-8: {e}") from e
    pos += id_len + source_len
    end = len(view) - _CRC.size
    fields = {}
    for bit, (name, dtype, trailing) in enumerate(_TRACKS):
        if not mask >> bit & 1:
            continue
        if name == "residue_annotation_tokens":
            if pos >= end:
                raise RecordFormatError(f"record {rid!r}: truncated before {name}")
            depth = view[pos]
            pos += 1
            if depth > T.RESIDUE_MAX_ANNOTATIONS:
                raise RecordFormatError(f"record {rid!r}: residue annotation depth {depth} > 16")
            trailing = (depth,)
        count = n * int(np.prod(trailing, dtype=np.int64))
        nbytes = count * dtype.itemsize
        if pos + nbytes > end:
            raise RecordFormatError(f"record {rid!r}: truncated in {name} ({end - pos} of {nbytes} bytes)")
        arr = np.frombuffer(view, dtype=dtype, count=count, offset=pos).reshape(n, *trailing)
        pos += nbytes
        if name == "residue_annotation_tokens" and depth < T.RESIDUE_MAX_ANNOTATIONS:
            full = np.zeros((n, T.RESIDUE_MAX_ANNOTATIONS), dtype)
            full[:, :depth] = arr
            arr = full
        fields[name] = arr
    if pos != end:
        raise RecordFormatError(f"record {rid!r}: {end - pos} unexpected bytes after the last track")
    return ProteinRecord(id=rid, source=source, **fields)


# --- ArrayRecord shards ------------------------------------------------------------------------


def write_shards(
    records: Iterable[ProteinRecord],
    out_dir: str | Path,
    records_per_shard: int,
    prefix: str = "records",
) -> list[Path]:
    """Write records to `out_dir/{prefix}-{i:05d}-of-{n:05d}.array_record`; returns the paths.

    Streams: at most one shard is open at a time. Shards are written under temporary names and
    renamed once the total count is known, so a crash never leaves a plausible-looking partial set.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if records_per_shard <= 0:
        raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_paths: list[Path] = []
    writer, in_shard = None, 0
    try:
        for record in records:
            if writer is None:
                tmp_paths.append(out / f".{prefix}-{len(tmp_paths):05d}.partial")
                writer = ArrayRecordWriter(str(tmp_paths[-1]), ARRAY_RECORD_OPTIONS)
            writer.write(serialize(record))
            in_shard += 1
            if in_shard == records_per_shard:
                writer.close()
                writer, in_shard = None, 0
    finally:
        if writer is not None:
            writer.close()
    final = [out / f"{prefix}-{i:05d}-of-{len(tmp_paths):05d}{SHARD_SUFFIX}" for i in range(len(tmp_paths))]
    for tmp, path in zip(tmp_paths, final):
        tmp.replace(path)
    return final


def list_shards(data_dir: str | Path) -> list[Path]:
    """The ArrayRecord shards of a dataset folder, in name order. Raises if there are none."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: dataset folder not found")
    shards = sorted(d.glob(f"*{SHARD_SUFFIX}"))
    if not shards:
        raise FileNotFoundError(f"{d}: no *{SHARD_SUFFIX} shards in this folder")
    return shards


def open_source(data_dir: str | Path):
    """A random-access Grain source of the raw record bytes of every shard in `data_dir`."""
    import grain

    return grain.sources.ArrayRecordDataSource([str(p) for p in list_shards(data_dir)])


class RecordReader:
    """Random access to the decoded records of an ArrayRecord dataset folder."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self._source = open_source(data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> ProteinRecord:
        try:
            return deserialize(self._source[index])
        except RecordFormatError as e:
            raise RecordFormatError(f"{self.data_dir}: record {index}: {e}") from e

    def __iter__(self) -> Iterator[ProteinRecord]:
        return (self[i] for i in range(len(self)))
