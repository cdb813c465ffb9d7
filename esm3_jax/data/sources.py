"""Readers for the raw inputs of `esm3-jax preprocess`: FASTA, jsonl, per-residue label files,
structure folders, and the annotation files that feed function tokens (SCOPe, label text).

Reading is split in two so that preprocessing can run on many workers and stay deterministic:

- `iter_entries(path)` walks an input in a fixed order and yields cheap `Entry`s (a FASTA record's
  text, a jsonl line, a structure file's path) without parsing anything expensive;
- `parse_entry(entry, options)` turns one entry into `RawProtein`s (a structure file can hold several
  chains), raising `SourceError` with a short, fixed `reason` for anything unusable.

A `RawProtein` is residue-aligned plain data (strings, float arrays, label lists); turning it into
token ids and validating it is preprocess.py's job.

Formats (any file may be gzipped):

- FASTA: `>id description` then sequence lines; upper or lower case, one trailing `*` allowed.
- jsonl: one object per line: `seq` (or `sequence`), optional `id`, `dssp8` (or `ss8`, one DSSP
  letter per residue; coil as L, C, '-' or ' '), `sccs` (a SCOPe family, used as a whole-protein
  function label with --function-from-sccs), `function` (a list of {label, start, end}, 1-indexed
  inclusive, labels from the function vocabulary).
- residue labels (ScanNet PPBS style): `>name`, then one `chain resnum aa label` line per residue,
  label 0 or 1; label 1 becomes one residue-annotation id.
- structures: PDB / mmCIF files, or folders searched recursively; one record per protein chain of
  the first model (structure/io.py decides what a chain is).
- SCOPe `dir.des` and `label<TAB>text` files feed function vocabularies and labels.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import re
import string
import subprocess
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from esm3_jax.data.function_tokens import FunctionAnnotation
from esm3_jax.structure.chain import StructureError

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas")  # protein FASTA (.fna would be nucleotides)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")


class SourceError(ValueError):
    """One entry of an input is unusable. `reason` is a short fixed phrase used to count rejects."""

    def __init__(self, reason: str, detail: str, record_id: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.record_id = record_id  # when known before the entry failed


@dataclasses.dataclass(frozen=True)
class Entry:
    """One unit of an input, enumerated cheaply; `location` is "path:line" or the file path."""

    kind: str  # "fasta" | "jsonl" | "residue_labels" | "structure" | "truncated" (the rest of a cut file)
    location: str
    data: object  # fasta: (header, sequence); jsonl: the line; residue_labels: (header, lines); structure: path


@dataclasses.dataclass(frozen=True, eq=False)
class RawProtein:
    """One protein as read, before tokenization. All per-residue fields have len(sequence) rows."""

    id: str
    source: str
    sequence: str  # one-letter codes, upper case
    ss8: str | None = None  # DSSP 8-state string, one letter per residue
    sasa: np.ndarray | None = None  # (L,) float, Angstrom^2, NaN where unknown
    coordinates: np.ndarray | None = None  # (L, 3, 3) N, CA, C; NaN where missing
    residue_index: np.ndarray | None = None  # (L,) author residue numbers (the structure encoder reads gaps)
    plddt: np.ndarray | None = None  # (L,) in [0, 1]
    chain_id: np.ndarray | None = None  # (L,) int
    function: tuple[FunctionAnnotation, ...] | None = None  # None: no function annotation at all
    residue_annotations: tuple[tuple[int, ...], ...] | None = None  # per residue: residue-annotation ids


@dataclasses.dataclass(frozen=True)
class ParseOptions:
    """What `parse_entry` needs beyond the entry itself (picklable: it travels to every worker)."""

    function_from_sccs: bool = False  # jsonl `sccs` -> a whole-protein function label
    ppi_annotation_id: int = 4  # residue-annotation id of a residue-label file's label 1
    plddt: str = "auto"  # structures: "auto" | "bfactor" | "one"
    scope_domains_path: str | None = None  # SCOPe des file: function labels for structure chains


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping `*.gz`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    if not p.is_file():
        # Preprocessing reads an input twice (the progress total, then the records) and a resumed
        # run checks its size: a pipe or a device can do neither.
        raise ValueError(f"{p}: not a regular file (a pipe or device cannot be read twice); save it to a file first")
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", errors="replace")
    return open(p, encoding="utf-8", errors="replace")


def _bare_suffix(path: Path) -> str:
    """`.fasta` for both x.fasta and x.fasta.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def input_kind(path: str | Path) -> str:
    """The kind of an input path: a structure folder, or a file type known by its extension."""
    p = Path(path)
    if p.is_dir():
        return "structure_dir"
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    return file_kind(p)


def file_kind(path: str | Path) -> str:
    """The kind of an input file by its extension (fasta, jsonl or structure)."""
    p = Path(path)
    suffix = _bare_suffix(p)
    if suffix in FASTA_SUFFIXES:
        return "fasta"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in STRUCTURE_SUFFIXES:
        return "structure"
    raise ValueError(
        f"{p}: unknown input type {suffix!r}; expected a folder of structures, FASTA ({', '.join(FASTA_SUFFIXES)}), "
        f"jsonl ({', '.join(JSONL_SUFFIXES)}) or a structure file ({', '.join(STRUCTURE_SUFFIXES)}), optionally .gz "
        "(per-residue label files go with --residue-labels)"
    )


# --- enumeration ------------------------------------------------------------------------------------


# A compressed input that ends early or is corrupt (a cut download) fails while being read.
STREAM_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


class _Truncated(Exception):
    def __init__(self, last_line: int, error: Exception):
        super().__init__(f"the compressed file ends early or is corrupt after line {last_line} ({error}); what follows is lost")
        self.last_line = last_line


def _numbered_lines(f) -> Iterator[tuple[int, str]]:
    n = 0
    try:
        for n, line in enumerate(f, 1):
            yield n, line
    except STREAM_ERRORS as e:
        raise _Truncated(n, e) from None


def _header_blocks(path: str | Path, open_fn=open_text) -> Iterator[tuple[int, str | None, list[str], str | None]]:
    """(line number, header, non-empty body lines, None) per `>` block; text before the first
    header is a block too, with header None (the caller rejects it). A block cut short by a broken
    compressed stream comes last, with the reason in place of None (the caller rejects it too)."""
    with open_fn(path) as f:
        header, start, lines = None, 1, []
        try:
            for n, line in _numbered_lines(f):
                line = line.strip()
                if line.startswith(">"):
                    if header is not None or lines:
                        yield start, header, lines, None
                    header, start, lines = line[1:].strip(), n, []
                elif line:
                    lines.append(line)
        except _Truncated as e:
            yield (start if header is not None or lines else e.last_line + 1), header, lines, str(e)
            return
        if header is not None or lines:
            yield start, header, lines, None


def _truncated_entry(location: str, detail: str, record_id: str | None) -> Entry:
    return Entry("truncated", location, (detail, record_id))


# `open_fn` opens a text file by name: open_text here, Beam's filesystems (object stores) in
# preprocess_beam.py. Locations name the path as given, whichever opened it.


def iter_fasta(path: str | Path, open_fn=open_text) -> Iterator[Entry]:
    """One entry per `>` record; text before the first header becomes an (unparsable) entry too."""
    for start, header, lines, broken in _header_blocks(path, open_fn):
        if broken:
            yield _truncated_entry(f"{path}:{start}", broken, header.split()[0] if header else None)
        else:
            yield Entry("fasta", f"{path}:{start}", (header, "".join(lines)))


def iter_jsonl(path: str | Path, open_fn=open_text) -> Iterator[Entry]:
    with open_fn(path) as f:
        try:
            for n, line in _numbered_lines(f):
                if line.strip():
                    yield Entry("jsonl", f"{path}:{n}", line)
        except _Truncated as e:
            yield _truncated_entry(f"{path}:{e.last_line + 1}", str(e), None)


def iter_residue_labels(path: str | Path, open_fn=open_text) -> Iterator[Entry]:
    """ScanNet-style per-residue labels: `>name`, then `chain resnum aa label` lines."""
    for start, header, lines, broken in _header_blocks(path, open_fn):
        if broken:
            yield _truncated_entry(f"{path}:{start}", broken, header)
        else:
            yield Entry("residue_labels", f"{path}:{start}", (header, tuple(lines)))


def structure_files(folder: str | Path) -> list[Path]:
    """Structure files under `folder` (recursive), in sorted path order."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and _bare_suffix(p) in STRUCTURE_SUFFIXES)


def iter_entries(path: str | Path, kind: str | None = None, open_fn=open_text) -> Iterator[Entry]:
    """Entries of one input, in a fixed order. `kind` overrides detection ("residue_labels")."""
    kind = kind or input_kind(path)
    if kind == "fasta":
        yield from iter_fasta(path, open_fn)
    elif kind == "jsonl":
        yield from iter_jsonl(path, open_fn)
    elif kind == "residue_labels":
        yield from iter_residue_labels(path, open_fn)
    elif kind == "structure":
        yield Entry("structure", str(path), str(path))
    elif kind == "structure_dir":
        for p in structure_files(path):
            yield Entry("structure", str(p), str(p))
    else:
        raise ValueError(f"{path}: unknown input kind {kind!r}")


# --- parsing -----------------------------------------------------------------------------------------


def _clean_sequence(seq: str) -> str:
    seq = "".join(seq.split()).upper()
    return seq[:-1] if seq.endswith("*") else seq  # a trailing stop codon is common in FASTA


def parse_entry(entry: Entry, options: ParseOptions) -> list[RawProtein | SourceError]:
    """The proteins of one entry; a list because a structure file may hold several chains, each of
    which is kept or rejected on its own."""
    try:
        if entry.kind == "fasta":
            return [_parse_fasta(entry)]
        if entry.kind == "jsonl":
            return [_parse_jsonl(entry, options)]
        if entry.kind == "residue_labels":
            return [_parse_residue_labels(entry, options)]
        if entry.kind == "structure":
            return _parse_structure_file(entry, options)
        if entry.kind == "truncated":
            detail, record_id = entry.data
            return [SourceError("truncated", detail, record_id)]
    except SourceError as e:
        return [e]
    raise ValueError(f"{entry.location}: unknown entry kind {entry.kind!r}")


def _parse_fasta(entry: Entry) -> RawProtein:
    header, seq = entry.data
    if header is None:
        raise SourceError("unparsable", "sequence text before the first '>' header")
    if not header:
        raise SourceError("unparsable", "empty FASTA header")
    return RawProtein(id=header.split()[0], source=entry.location, sequence=_clean_sequence(seq))


def _parse_jsonl(entry: Entry, options: ParseOptions) -> RawProtein:
    try:
        row = json.loads(entry.data)
    except json.JSONDecodeError as e:
        raise SourceError("unparsable", f"not JSON ({e})") from None
    if not isinstance(row, dict):
        raise SourceError("unparsable", f"a JSON {type(row).__name__}, expected an object")
    rid = str(row.get("id", entry.location))
    seq = row.get("seq", row.get("sequence"))
    if not isinstance(seq, str):
        raise SourceError("unparsable", "no string field 'seq' (or 'sequence')", rid)
    seq = _clean_sequence(seq)
    ss8 = row.get("dssp8", row.get("ss8"))
    if ss8 is not None and not isinstance(ss8, str):
        raise SourceError("unparsable", "field 'dssp8' is not a string", rid)
    if ss8 is not None and len(ss8) != len(seq):
        raise SourceError("length mismatch", f"sequence has {len(seq)} residues, dssp8 has {len(ss8)}", rid)
    function = None
    if "function" in row:
        try:
            function = tuple(
                FunctionAnnotation(str(a["label"]), int(a["start"]), int(a["end"])) for a in row["function"]
            )
        except (TypeError, KeyError, ValueError):
            raise SourceError("unparsable", "field 'function' must be a list of {label, start, end}", rid) from None
    if options.function_from_sccs and row.get("sccs"):
        function = (function or ()) + (FunctionAnnotation(str(row["sccs"]), 1, len(seq)),)
    return RawProtein(id=rid, source=entry.location, sequence=seq, ss8=ss8, function=function)


def _parse_residue_labels(entry: Entry, options: ParseOptions) -> RawProtein:
    header, lines = entry.data
    if header is None:
        raise SourceError("unparsable", "label lines before the first '>' header")
    residues, annotations = [], []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if len(fields) != 4 or fields[3] not in ("0", "1") or len(fields[2]) != 1:
            raise SourceError("unparsable", f"residue line {n} {line[:60]!r} is not `chain resnum aa 0|1`", header)
        residues.append(fields[2])
        annotations.append((options.ppi_annotation_id,) if fields[3] == "1" else ())
    return RawProtein(
        id=header, source=entry.location, sequence="".join(residues).upper(), residue_annotations=tuple(annotations)
    )


# --- structures -------------------------------------------------------------------------------------------

# structure.io's reject keys -> this module's reasons (shared with the sequence sources where they mean
# the same thing).
_STRUCTURE_REASONS = {
    "not_a_structure": "unparsable",
    "no_protein": "no protein chains",
    "empty_chain": "empty",
    "no_complete_backbone": "no backbone",
    "bad_coordinates": "bad coordinates",
    "chain_not_found": "chain not found",
    "too_long": "too long",
}
# Text that only a predicted model's file holds: ModelCIF's per-residue QA table (AlphaFold DB and
# other ModelCIF writers), or a predictor's name in the header.
_MODELCIF_LOCAL_QA = b"_ma_qa_metric_local"
_PREDICTOR_NAMES = (b"ALPHAFOLD", b"ESMFOLD", b"COLABFOLD", b"OPENFOLD")
_MMCIF_ENTRY_ID = re.compile(rb"^_entry\.id\s+['\"]?([0-9][A-Za-z0-9]{3})['\"]?\s*$", re.MULTILINE)
_PDB_HEADER_ID = re.compile(rb"^HEADER.{56}([0-9][A-Za-z0-9]{3})", re.MULTILINE)


def _file_header(path: str) -> tuple[bool, str | None]:
    """(is a predicted model, PDB id) from the file's own text.

    The PDB id comes from mmCIF `_entry.id` or the PDB HEADER line, never from the file name: file
    names lie (a docking benchmark's `1XU1_l_u_A.pdb` holds chain A of entry 1XUT).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        text = f.read()
    head = text[: 1 << 16]  # PDB headers and mmCIF preambles sit at the top
    predicted = _MODELCIF_LOCAL_QA in text or any(name in head.upper() for name in _PREDICTOR_NAMES)
    m = _MMCIF_ENTRY_ID.search(head) or _PDB_HEADER_ID.search(head)
    return predicted, m.group(1).decode().lower() if m else None


def _plddt(chain, predicted: bool) -> np.ndarray:
    """(L,) in [0, 1]: B-factors of a predicted model (0-100 or 0-1 scale), else 1.0; 0 without backbone.

    0 where the backbone is missing matches what the reference feeds the model for such residues.
    """
    if predicted:
        b_L = np.nan_to_num(chain.b_factor.astype(np.float32), nan=0.0)
        plddt_L = b_L / 100.0 if b_L.max(initial=0.0) > 1.0 else b_L
    else:
        plddt_L = np.ones(len(chain), np.float32)
    return np.where(chain.backbone_mask, np.clip(plddt_L, 0.0, 1.0), 0.0).astype(np.float32)


def _author_number(key: str) -> int:
    """`12` or `12A` (author number, insertion code) -> 12."""
    return int(key.rstrip(string.ascii_letters))


def _scope_function(chain, pdb_id: str, domains: dict) -> tuple[FunctionAnnotation, ...] | None:
    """Function labels (SCOPe family sccs) over the residues each domain of this chain covers.

    `domains` is `scope_domains` output; `pdb_id` lower case.
    """
    annotations = []
    numbers = chain.residue_index
    for dom in domains.get((pdb_id, chain.chain_id), ()):
        for seg_chain, first, last in dom.segments:
            if seg_chain != chain.chain_id:
                continue
            if first is None:
                inside = np.ones(len(chain), bool)
            else:
                # Author numbering; a range bound's insertion code is ignored (ranges that end inside
                # an insertion run are rare, and the domain boundary is soft there anyway).
                lo, hi = _author_number(first), _author_number(last)
                inside = (numbers >= lo) & (numbers <= hi)
            # One annotation per contiguous run of covered positions (1-indexed, inclusive).
            edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(np.int8), [0]])))
            for start, stop in zip(edges[::2], edges[1::2]):
                annotations.append(FunctionAnnotation(dom.sccs, int(start) + 1, int(stop)))
    return tuple(annotations) if annotations else None


@functools.cache
def _scope_domains_cached(path: str) -> dict:
    return scope_domains(read_scope_des(path, ("px",)))


def _parse_structure_file(entry: Entry, options: ParseOptions) -> list[RawProtein | SourceError]:
    """Every protein chain of the file's first model: coordinates, SS8 (mkdssp), SASA, pLDDT.

    The file read is `entry.data`; ids and sources name `entry.location` (the same path, unless the
    file was copied from an object store to a local temporary file)."""
    from esm3_jax.structure import features, io as sio

    path, name = str(entry.data), entry.location

    def named(text: str) -> str:
        return text.replace(path, name) if path != name else text

    try:
        # Per-chain results (a chain or the StructureError that rules it out), so that every bad chain
        # is listed in rejects.jsonl by name. structure.io keeps this private for now; iter_chains
        # only counts skipped chains.
        items = list(sio.read_chains(path))
    except StructureError as e:
        return [SourceError(_STRUCTURE_REASONS.get(e.reason, e.reason), named(str(e)))]
    looks_predicted, pdb_id = _file_header(path)
    predicted = options.plddt == "bfactor" or (options.plddt == "auto" and looks_predicted)
    domains = _scope_domains_cached(options.scope_domains_path) if options.scope_domains_path else {}
    # Record ids name chains as every output does (1A0J_A.pdb chain A -> 1A0J_A).
    out: list[RawProtein | SourceError] = []
    for chain in items:
        if isinstance(chain, StructureError):
            rid = sio.chain_name(name, chain.chain) if chain.chain is not None else None
            out.append(SourceError(_STRUCTURE_REASONS.get(chain.reason, chain.reason), named(str(chain)), rid))
            continue
        try:
            # SS8 from DSSP on the chain alone, like the SASA: a record is one chain. A missing mkdssp
            # (DsspNotFoundError) is not caught: it is the run's problem, not this chain's.
            ss8, sasa_L = features.dssp_ss8(chain), features.sasa(chain)
        except (features.DsspError, subprocess.TimeoutExpired, ValueError) as e:
            detail = named(f"{chain.name}: {e}")
            out.append(SourceError("structure features failed", detail, sio.chain_name(name, chain.chain_id)))
            continue
        out.append(
            RawProtein(
                id=sio.chain_name(name, chain.chain_id),
                source=f"{name}:{chain.chain_id}",
                sequence=chain.sequence,
                ss8=ss8,
                sasa=sasa_L,
                coordinates=np.asarray(chain.backbone, np.float32),
                residue_index=np.asarray(chain.residue_index),
                plddt=_plddt(chain, predicted),
                function=_scope_function(chain, pdb_id, domains) if domains and pdb_id else None,
            )
        )
    return out


# --- annotation text for function vocabularies -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScopeRow:
    sunid: int
    level: str  # cl, cf, sf, fa, dm, sp, px
    sccs: str  # e.g. a.1.1.1
    sid: str  # domain id for px rows (d1ux8a_), else "-"
    description: str  # a name, or for px rows "1ux8 A:" / "3ciu B:2-146"


def read_scope_des(path: str | Path, levels: Sequence[str] | None = None) -> list[ScopeRow]:
    """Rows of a SCOPe `dir.des` file (tab-separated: sunid, level, sccs, sid, description).

    `levels` keeps only those row kinds (e.g. ("cl", "cf", "sf", "fa") for the names). A file that
    concatenates several releases (newest first, as ../shared/data's does) lists an entry once per
    release: the first row of each sunid wins.
    """
    keep = set(levels) if levels is not None else None
    rows: dict[int, ScopeRow] = {}
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.startswith("#") or not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 5 or not fields[0].isdigit():
                raise ValueError(f"{path}:{n}: not a SCOPe dir.des row (sunid, level, sccs, sid, description)")
            if keep is not None and fields[1] not in keep:
                continue
            sunid = int(fields[0])
            if sunid not in rows:
                rows[sunid] = ScopeRow(sunid, fields[1], fields[2], fields[3], fields[4])
    if not rows:
        raise ValueError(f"{path}: no SCOPe rows{f' of levels {sorted(keep)}' if keep else ''}")
    return list(rows.values())


SCOPE_NAME_LEVELS = ("cl", "cf", "sf", "fa")  # the rows whose descriptions are class/fold/superfamily/family names

# SCOPe's catch-all family for automatically classified domains; its name says nothing about function.
_SCOPE_UNINFORMATIVE = {"automated matches"}


def scope_label_texts(rows: Sequence[ScopeRow]) -> dict[str, list[str]]:
    """Keyword text per SCOPe family: {family sccs: [class, fold, superfamily, family names]}."""
    names: dict[tuple[str, str], str] = {}
    for r in rows:  # first row wins: the newest release in a concatenation (see read_scope_des)
        if r.level in SCOPE_NAME_LEVELS:
            names.setdefault((r.level, r.sccs), r.description)
    texts = {}
    for (level, sccs), _ in names.items():
        if level != "fa":
            continue
        parts = sccs.split(".")
        lineage = [("cl", parts[0]), ("cf", ".".join(parts[:2])), ("sf", ".".join(parts[:3])), ("fa", sccs)]
        texts[sccs] = [names[k] for k in lineage if k in names and names[k] not in _SCOPE_UNINFORMATIVE]
    return texts


_SCOPE_SEGMENT = re.compile(r"^([A-Za-z0-9]+):(?:(-?\d+[A-Za-z]?)-(-?\d+[A-Za-z]?))?$")


@dataclasses.dataclass(frozen=True)
class ScopeDomain:
    sid: str
    sccs: str
    pdb_id: str
    # (chain, first, last) author residue numbers as written ("12", "12A"); first = last = None: whole chain
    segments: tuple[tuple[str, str | None, str | None], ...]


def scope_domains(rows: Sequence[ScopeRow]) -> dict[tuple[str, str], list[ScopeDomain]]:
    """SCOPe domains by (pdb id, chain): which residue ranges of a PDB chain belong to which family.

    Domains whose px description does not parse (rare odd ranges) are left out. A domain listed
    again (an older release, maybe classified differently) keeps its first listing.
    """
    by_chain: dict[tuple[str, str], list[ScopeDomain]] = {}
    seen: set[str] = set()
    for r in rows:
        if r.level != "px" or r.sid in seen:
            continue
        seen.add(r.sid)
        pdb_id, _, ranges = r.description.partition(" ")
        segments = []
        for seg in ranges.split(","):
            m = _SCOPE_SEGMENT.match(seg.strip())
            if m is None:
                segments = []
                break
            segments.append((m.group(1), m.group(2), m.group(3)))
        if not segments:
            continue
        dom = ScopeDomain(r.sid, r.sccs, pdb_id.lower(), tuple(segments))
        for chain in dict.fromkeys(s[0] for s in segments):
            by_chain.setdefault((dom.pdb_id, chain), []).append(dom)
    return by_chain


def read_label_text(path: str | Path) -> Iterator[tuple[str, str]]:
    """`label<TAB>text` lines (blank lines and `#` comments skipped)."""
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            label, tab, text = line.rstrip("\n").partition("\t")
            if not tab or not label or not text.strip():
                raise ValueError(f"{path}:{n}: expected `label<TAB>description text`")
            yield label, text
